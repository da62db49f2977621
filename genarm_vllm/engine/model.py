"""GenARMForCausalLM: a base LM and its autoregressive reward models as one vLLM model.

Each sub-model is an ordinary vLLM model with its own attention layers, so the KV cache
manager gives every reward model (ARM) its own paged KV tensors under the same block
table: continuous batching, chunked prefill, prefix caching and preemption cover all
models at once. `forward` runs every sub-model on the same tokens and returns their
hidden states side by side; `compute_logits` splits them, mixes with the engine's default
guidance, and keeps the step's logits for `GenARMLogitsProcessor`, which
re-mixes the rows of requests that carry their own guidance.

Selected through the hf_config fields described in genarm_vllm/guidance.py.
"""

from __future__ import annotations

import functools
import string
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig
from vllm.compilation.backends import set_model_tag
from vllm.config import VllmConfig
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.utils import initialize_model
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model
from vllm.platforms import current_platform

from genarm_vllm.engine.attention_backend import use_safe_attention_backend
from genarm_vllm.engine.configs import text_config
from genarm_vllm.engine.lora_adapter import check_adapter_fits, is_lora_adapter, read_adapter
from genarm_vllm.engine.lora_arm import LoRAARM
from genarm_vllm.engine.prompt_views import ModelView, PromptViews, scatter_rows
from genarm_vllm.engine.stacked_llama import check_base_layout, stacked_forward
from genarm_vllm.engine.step_logits import STEP_LOGITS, StepLogits, publish_step_logits
from genarm_vllm.engine.validation import check_reward_models, tokenizer_length
from genarm_vllm.guidance import ARCHITECTURE, SELF_MODEL, GuidanceConfig
from genarm_vllm.mixing import tokenizer_scores


def _has_layer_metadata() -> bool:
    """A real step: the forward context holds per-layer attention metadata (not a dummy run)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return is_forward_context_available() and isinstance(get_forward_context().attn_metadata, dict)


def piecewise_graph_outputs(vllm_config: VllmConfig) -> bool:
    """Whether a compiled sub-model's output may be overwritten by the next one's graphs.

    Under piecewise CUDA graphs (vLLM 0.33) each sub-model's compiled forward is a chain of
    captured pieces, and the LAST piece's output is a weak reference into the graph pool
    shared by all graphs (compilation/backends.py `wrap_with_cudagraph_if_needed`:
    `weak_ref_output=is_last_graph`; compilation/cuda_graph.py `CUDAGraphWrapper`: the
    capture frees it and every replay returns `weak_ref_tensors(output)`). A sub-model
    captured after it may reuse that memory, so the base's (or an earlier ARM's) hidden
    states must be copied before the next sub-model runs; vLLM's gemma3n does the same
    (model_executor/models/gemma3n.py, `.clone()`). Read per step: the model runner may
    still change the mode after the model is built (`resolve_cudagraph_mode_and_sizes`,
    v1/worker/gpu/model_runner.py). CPU or eager engines pay nothing."""
    mode = vllm_config.compilation_config.cudagraph_mode
    return (current_platform.is_cuda_alike() and mode is not None
            and mode.has_piecewise_cudagraphs())


def reward_model_prefix(index: int) -> str:
    # Attention layer names must hold exactly one integer (the layer index), so
    # sub-models are named by letter: arm_a, arm_b, ...
    return f"arm_{string.ascii_lowercase[index]}"


def reward_model_quant_config(arm_vllm_config: VllmConfig, path: str):
    """A full-weight reward model's own quantization, built from ITS config.json's
    quantization_config (e.g. GPTQ or AWQ) as vLLM builds a model's, None when it has none:
    the base's quantization (or lack of one) never applies to it. vLLM does the same for a
    draft model (get_draft_quant_config, vllm/model_executor/models/utils.py)."""
    import copy

    hf_config = arm_vllm_config.model_config.hf_config
    quantization = (getattr(hf_config, "quantization_config", None)
                    or getattr(text_config(hf_config), "quantization_config", None))
    if quantization is None:
        return None
    model_config = copy.deepcopy(arm_vllm_config.model_config)  # with the ARM's hf_config
    model_config.model = str(path)  # its checkpoint (vLLM reads the quantized layers off it)
    model_config.quantization = None  # the base's method (or the user's --quantization)
    model_config.quantization_config = None  # the base's online-quantization arguments
    try:
        model_config._verify_quantization()  # picks the method from the ARM's own config
        return VllmConfig.get_quantization_config(model_config, arm_vllm_config.load_config)
    except ValueError as e:
        raise ValueError(
            f"reward model {path} is quantized ({dict(quantization).get('quant_method')}) "
            f"and cannot load with this engine: {e}"
        ) from e


@dataclass
class RewardModel:
    """One reward model (ARM) of the composite, as the forward and the logits need it."""

    name: str  # its attribute and weight-name prefix: arm_a, arm_b, ...
    module: nn.Module  # a vLLM causal LM, or a LoRAARM on the base's weights
    on_base_weights: bool  # a LoRA ARM: runs stacked with the base, shares its LM head
    hidden_size: int
    embedding_rows: int | None  # ids it can embed; None: the base's own embedding


class GenARMForCausalLM(nn.Module):
    """A base causal LM guided by K autoregressive reward models (GenARM)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        model_config = vllm_config.model_config
        guidance = GuidanceConfig.from_hf_config(model_config.hf_config)
        if len(guidance.reward_models) > len(string.ascii_lowercase):
            raise ValueError(f"at most {len(string.ascii_lowercase)} reward models are supported")
        if not guidance.base_architectures:
            raise ValueError(
                f"{ARCHITECTURE} needs genarm_base_architectures (the base model's own "
                "architectures, e.g. ['LlamaForCausalLM']) in its config"
            )
        # model_config.model is the base (or bundle) folder; model_config.tokenizer may be
        # another folder (vLLM's tokenizer=) holding only the tokenizer.
        check_reward_models(
            model_config.model,
            guidance.reward_models,
            tokenizer=model_config.tokenizer,
            max_model_len=model_config.max_model_len,
            tensor_parallel_size=vllm_config.parallel_config.tensor_parallel_size,
            speculative_config=vllm_config.speculative_config,
            pipeline_parallel_size=vllm_config.parallel_config.pipeline_parallel_size,
        )
        # A LoRA reward model (a PEFT adapter folder) runs on the base's weights
        # (lora_arm.py): the base's config, no weights of its own but A/B.
        adapters = {
            path: check_adapter_fits(read_adapter(path), model_config.hf_config, model_config.model)
            for path in guidance.reward_models if is_lora_adapter(path)
        }
        arm_configs = [
            model_config.hf_config if path in adapters or path == SELF_MODEL
            else AutoConfig.from_pretrained(path)
            for path in guidance.reward_models
        ]
        if current_platform.is_cuda():
            use_safe_attention_backend(vllm_config, arm_configs)
        self.config = model_config.hf_config
        self.vllm_config = vllm_config  # the key of this engine's step hand-off
        weakref.finalize(self, STEP_LOGITS.pop, id(vllm_config), None)
        self.vocab_size = tokenizer_length(model_config.tokenizer)

        self.base = init_vllm_registered_model(
            vllm_config,
            hf_config=model_config.hf_config,
            architectures=guidance.base_architectures,
            prefix="base",
        )
        self.base_hidden_size = text_config(model_config.hf_config).hidden_size
        self.arms: list[RewardModel] = []
        self.secondary_weights = []
        base_vocab = text_config(model_config.hf_config).vocab_size
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        for i, (path, arm_config) in enumerate(zip(guidance.reward_models, arm_configs)):
            name = reward_model_prefix(i)
            if path in adapters or path == SELF_MODEL:  # "self": no adapter
                if not self.lora_arms:
                    check_base_layout(self.base.model)
                module = LoRAARM(adapters.get(path), self.base.model, vllm_config, name)
                self.arms.append(RewardModel(name, module, True, self.base_hidden_size, None))
            else:
                arm_vllm_config = vllm_config.with_hf_config(arm_config)
                # The ARM's own quantization (None if unquantized), never the base's.
                arm_vllm_config.quant_config = reward_model_quant_config(arm_vllm_config, path)
                # Separate torch.compile cache per sub-model.
                with set_model_tag(name):
                    module = initialize_model(vllm_config=arm_vllm_config, prefix=name)
                config = text_config(arm_config)
                self.arms.append(RewardModel(name, module, False, config.hidden_size, config.vocab_size))
                if config.vocab_size < base_vocab:
                    # Its clamped token ids (see _arm_input_ids), at one address for every
                    # step: a captured graph reads its inputs from the address recorded at
                    # capture (compilation/cuda_graph.py), and a fresh clamp() result would
                    # leave the ARM reading stale ids. int32 and max_num_batched_tokens
                    # rows, as the runners' own input_ids buffer (v1/worker/gpu/input_batch.py).
                    self.register_buffer(f"{name}_ids", torch.zeros(max_tokens, dtype=torch.int32),
                                         persistent=False)
                # The default loader reads these after the base checkpoint, names prefixed.
                self.secondary_weights.append(DefaultModelLoader.Source(path, None, prefix=f"{name}."))
            setattr(self, name, module)
        self.register_buffer(
            "default_beta", torch.tensor([guidance.beta], dtype=torch.float32), persistent=False
        )
        self.register_buffer(
            "default_weights",
            torch.tensor([guidance.weights], dtype=torch.float32),
            persistent=False,
        )
        self.make_empty_intermediate_tensors = getattr(
            self.base, "make_empty_intermediate_tensors", None
        )

    @property
    def lora_arms(self) -> list[RewardModel]:
        return [arm for arm in self.arms if arm.on_base_weights]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_input_ids(input_ids)

    def _arm_input_ids(self, arm: RewardModel, input_ids: torch.Tensor) -> torch.Tensor:
        """The ids a full-weight ARM reads. An id beyond its embedding rows is never sampled
        (the mix gives it -inf) and vLLM's prompt check refuses prompts holding one
        (plugin.py); the clamp only keeps a request that slipped past from crashing the
        engine. ARMs with the base's vocabulary or more read vLLM's own ids."""
        buffer = getattr(self, f"{arm.name}_ids", None)
        if buffer is None:
            return input_ids
        n = input_ids.shape[0]
        if n > buffer.shape[0]:  # not a step vLLM schedules (at most max_num_batched_tokens)
            return input_ids.clamp(max=arm.embedding_rows - 1)
        return torch.clamp(input_ids, max=arm.embedding_rows - 1, out=buffer[:n])

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Hidden states of the base, then of each reward model, side by side [T, sum H]."""
        if input_ids is None:
            raise NotImplementedError("GenARM reward models need token ids, not prompt embeddings")
        # Requests whose models read their own prompts (prompt_views.py); none: fast path.
        requests = self.prompt_views.active_requests()
        if requests and _has_layer_metadata():
            with self.prompt_views.views(requests, input_ids, positions) as views:
                return self._forward_views(views, input_ids)
        lora_arms = self.lora_arms
        full_arms = [arm for arm in self.arms if not arm.on_base_weights]
        # Outputs of compiled sub-models that another one's graphs could overwrite
        # (piecewise_graph_outputs); the stacked forward runs eagerly, outside any graph.
        keep = bool(full_arms) and piecewise_graph_outputs(self.vllm_config)
        if lora_arms:  # base and LoRA ARMs in one pass over the base's weights
            stacked = stacked_forward(
                self.base.model, [arm.module for arm in lora_arms], input_ids, positions
            )
            base_hidden, *lora_hidden = stacked.chunk(len(lora_arms) + 1)
            hidden = dict(zip((arm.name for arm in lora_arms), lora_hidden))
        else:
            base_hidden = self.base(input_ids, positions, intermediate_tensors, inputs_embeds)
            if keep:
                base_hidden = base_hidden.clone()
            hidden = {}
        for j, arm in enumerate(full_arms):
            out = arm.module(self._arm_input_ids(arm, input_ids), positions)
            hidden[arm.name] = out.clone() if keep and j < len(full_arms) - 1 else out
        return torch.cat([base_hidden, *(hidden[arm.name] for arm in self.arms)], dim=-1)

    @functools.cached_property
    def prompt_views(self) -> PromptViews:
        return PromptViews(self.vllm_config, [self.base, *(arm.module for arm in self.arms)])

    def _forward_views(self, views: list[ModelView], input_ids: torch.Tensor) -> torch.Tensor:
        """forward() with every model on its own view of the batch (per-model prompts)."""
        num_rows = input_ids.shape[0]
        base_view, arm_views = views[0], dict(zip((arm.name for arm in self.arms), views[1:]))
        hidden = {}
        lora_arms = self.lora_arms
        stacked_models = [("base", base_view)] + [(arm.name, arm_views[arm.name]) for arm in lora_arms]
        if lora_arms and any(v.rows.numel() for _, v in stacked_models):
            stacked = stacked_forward(
                self.base.model, [arm.module for arm in lora_arms], input_ids, None,
                views=[(v.input_ids, v.positions) for _, v in stacked_models],
            )
            parts = stacked.split([v.rows.numel() for _, v in stacked_models])
            hidden.update((name, part) for (name, _), part in zip(stacked_models, parts))
        elif not lora_arms and base_view.rows.numel():
            hidden["base"] = self.base(base_view.input_ids, base_view.positions)
        # As in forward: copy compiled outputs before the next sub-model's graphs run.
        full_arms = [arm for arm in self.arms
                     if not arm.on_base_weights and arm_views[arm.name].rows.numel()]
        keep = bool(full_arms) and piecewise_graph_outputs(self.vllm_config)
        if keep and not lora_arms and "base" in hidden:
            hidden["base"] = hidden["base"].clone()
        for j, arm in enumerate(full_arms):
            view = arm_views[arm.name]
            out = arm.module(self._arm_input_ids(arm, view.input_ids), view.positions)
            hidden[arm.name] = out.clone() if keep and j < len(full_arms) - 1 else out
        widths = [("base", base_view, self.base_hidden_size)] + [
            (arm.name, arm_views[arm.name], arm.hidden_size) for arm in self.arms]
        like = next(iter(hidden.values()), None)
        if like is None:
            like = self.base.embed_input_ids(input_ids[:1])
        return torch.cat([
            scatter_rows(view, hidden[name], num_rows, width, like) if name in hidden
            else like.new_zeros((num_rows, width))
            for name, view, width in widths
        ], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        base_hidden, *arm_hidden = hidden_states.split(
            [self.base_hidden_size, *(arm.hidden_size for arm in self.arms)], dim=-1
        )
        arm_hidden = dict(zip((arm.name for arm in self.arms), arm_hidden))
        # The LoRA ARMs' rows go through the base's LM head with the base's, as one matmul.
        lora_arms = self.lora_arms
        stacked = self.base.compute_logits(
            torch.cat([base_hidden, *(arm_hidden[arm.name] for arm in lora_arms)])
            if lora_arms else base_hidden
        )
        # Every full-weight ARM computes its logits on every rank (under tensor parallel,
        # a collective), even where the base's rank does not sample.
        logits = {
            arm.name: arm.module.compute_logits(arm_hidden[arm.name])
            for arm in self.arms if not arm.on_base_weights
        }
        if stacked is None:  # a tensor-parallel rank that does not sample
            return None
        base_logits, *lora_logits = stacked.chunk(len(lora_arms) + 1)
        logits.update(zip((arm.name for arm in lora_arms), lora_logits))
        step = StepLogits(
            tokenizer_scores(base_logits, self.vocab_size),
            [tokenizer_scores(logits[arm.name], self.vocab_size) for arm in self.arms],
            base_logits.shape[-1],
            self.default_beta,
            self.default_weights,
        )
        publish_step_logits(self.vllm_config, step)
        # float32: the sampler works in float32 anyway.
        return step.mix_defaults()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The base checkpoint's names carry no prefix; reward models' carry theirs.
        arm_prefixes = tuple(f"{arm.name}." for arm in self.arms)
        weights = (
            (name if name.startswith(arm_prefixes) else f"base.{name}", tensor)
            for name, tensor in weights
        )
        loaded = AutoWeightsLoader(self).load_weights(weights)
        for arm in self.lora_arms:
            loaded |= arm.module.load_adapter()
        return loaded
