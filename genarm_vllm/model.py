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

import string
import weakref
from collections.abc import Iterable

import torch
from torch import nn
from transformers import AutoConfig
from vllm.compilation.backends import set_model_tag
from vllm.config import VllmConfig
from vllm.platforms import current_platform
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.utils import initialize_model
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model

from genarm_vllm.guidance import ARCHITECTURE, GuidanceConfig
from genarm_vllm import lora_arm
from genarm_vllm.mixing import tokenizer_columns
from genarm_vllm.step_logits import STEP_LOGITS, StepLogits, publish_step_logits
from genarm_vllm.validation import (
    check_reward_models,
    choose_attention_backend,
    head_size,
    tokenizer_length,
)


def reward_model_prefix(index: int) -> str:
    # Attention layer names must hold exactly one integer (the layer index), so
    # sub-models are named by letter: arm_a, arm_b, ...
    return f"arm_{string.ascii_lowercase[index]}"


def _use_safe_attention_backend(vllm_config: VllmConfig, arm_configs: list) -> None:
    """On CUDA: pick an attention backend safe for every sub-model's head size (see
    validation.choose_attention_backend), before any Attention layer is built.

    vLLM 0.33 selects a backend per Attention layer as the layer is constructed, from the
    current config's attention_config (v1/attention/selector.py get_attn_backend), and
    with_hf_config copies share that attention_config: setting it here reaches every
    sub-model. The block size is settled after the model loads, from the layers' backends
    (platforms/interface.py update_block_size_for_backend).
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    attention = vllm_config.attention_config
    selected = attention.backend.name if attention.backend is not None else None
    backend = choose_attention_backend(
        head_size(vllm_config.model_config.hf_config),
        [head_size(c) for c in arm_configs],
        str(vllm_config.model_config.dtype).removeprefix("torch."),
        selected,
    )
    if backend is not None:
        attention.backend = AttentionBackendEnum[backend]


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
        check_reward_models(
            model_config.tokenizer,
            guidance.reward_models,
            max_model_len=model_config.max_model_len,
            tensor_parallel_size=vllm_config.parallel_config.tensor_parallel_size,
            speculative_config=vllm_config.speculative_config,
            pipeline_parallel_size=vllm_config.parallel_config.pipeline_parallel_size,
        )
        # A LoRA reward model (a PEFT adapter folder) runs on the base's weights
        # (genarm_vllm/lora_arm.py): the base's config, no weights of its own but A/B.
        adapters = {
            path: lora_arm.check_adapter_fits(
                lora_arm.read_adapter(path), model_config.hf_config, model_config.tokenizer
            )
            for path in guidance.reward_models if lora_arm.is_lora_adapter(path)
        }
        arm_configs = [
            model_config.hf_config if path in adapters else AutoConfig.from_pretrained(path)
            for path in guidance.reward_models
        ]
        if current_platform.is_cuda():
            _use_safe_attention_backend(vllm_config, arm_configs)
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
        self.reward_model_names = []
        self.lora_arm_names = []  # the reward models that run stacked on the base's weights
        self.embedding_rows = []
        hidden_sizes = [model_config.hf_config.get_text_config().hidden_size]
        self.secondary_weights = []
        for i, (path, arm_config) in enumerate(zip(guidance.reward_models, arm_configs)):
            name = reward_model_prefix(i)
            if path in adapters:
                if not self.lora_arm_names:
                    lora_arm.check_base_layout(self.base.model)
                setattr(self, name, lora_arm.LoRAARM(adapters[path], self.base.model, vllm_config, name))
                self.reward_model_names.append(name)
                self.lora_arm_names.append(name)
                hidden_sizes.append(hidden_sizes[0])
                self.embedding_rows.append(None)
                continue
            arm_vllm_config = vllm_config.with_hf_config(arm_config)
            # The base's quantization does not apply to an unquantized reward model.
            arm_vllm_config.quant_config = None
            # Separate torch.compile cache per sub-model.
            with set_model_tag(name):
                setattr(self, name, initialize_model(vllm_config=arm_vllm_config, prefix=name))
            self.reward_model_names.append(name)
            hidden_sizes.append(arm_config.get_text_config().hidden_size)
            self.embedding_rows.append(arm_config.get_text_config().vocab_size)
            # The default loader reads these after the base checkpoint, names prefixed.
            self.secondary_weights.append(
                DefaultModelLoader.Source(path, None, prefix=f"{name}.")
            )
        self.hidden_sizes = hidden_sizes
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
    def reward_models(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.reward_model_names]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if input_ids is None:
            raise NotImplementedError("GenARM reward models need token ids, not prompt embeddings")
        lora_arms = [getattr(self, name) for name in self.lora_arm_names]
        if lora_arms:  # base and LoRA ARMs in one pass over the base's weights
            stacked = lora_arm.stacked_forward(self.base.model, lora_arms, input_ids, positions)
            hidden_states = list(stacked.chunk(len(lora_arms) + 1))
            lora_hidden = dict(zip(self.lora_arm_names, hidden_states[1:]))
            hidden_states = hidden_states[:1]
        else:
            hidden_states = [self.base(input_ids, positions, intermediate_tensors, inputs_embeds)]
        for name, arm, rows in zip(self.reward_model_names, self.reward_models, self.embedding_rows):
            if name in self.lora_arm_names:
                hidden_states.append(lora_hidden[name])
                continue
            # An id beyond an ARM's embedding rows is never sampled (the mix gives it -inf)
            # and vLLM's prompt check refuses prompts holding one (plugin.py); the clamp
            # only keeps a request that slipped past from crashing the engine.
            hidden_states.append(arm(input_ids.clamp(max=rows - 1), positions))
        return torch.cat(hidden_states, dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        parts = hidden_states.split(self.hidden_sizes, dim=-1)
        # The LoRA ARMs' rows go through the base's LM head with the base's, as one matmul.
        lora = [i for i, name in enumerate(self.reward_model_names) if name in self.lora_arm_names]
        stacked = self.base.compute_logits(
            torch.cat([parts[0]] + [parts[1 + i] for i in lora]) if lora else parts[0]
        )
        stacked = [None] * (len(lora) + 1) if stacked is None else stacked.chunk(len(lora) + 1)
        base_logits, lora_logits = stacked[0], dict(zip(lora, stacked[1:]))
        reward_logits = [
            lora_logits[i] if i in lora_logits else arm.compute_logits(h)
            for i, (arm, h) in enumerate(zip(self.reward_models, parts[1:]))
        ]
        if base_logits is None:  # a tensor-parallel rank that does not sample
            return None
        step = StepLogits(
            tokenizer_columns(base_logits, self.vocab_size),
            [tokenizer_columns(logits, self.vocab_size) for logits in reward_logits],
            base_logits.shape[-1],
            self.default_beta,
            self.default_weights,
        )
        publish_step_logits(self.vllm_config, step)
        # float32: the sampler works in float32 anyway.
        return step.mix_defaults()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The base checkpoint's names carry no prefix; reward models' carry theirs.
        arm_prefixes = tuple(f"{name}." for name in self.reward_model_names)
        weights = (
            (name if name.startswith(arm_prefixes) else f"base.{name}", tensor)
            for name, tensor in weights
        )
        loaded = AutoWeightsLoader(self).load_weights(weights)
        for name in self.lora_arm_names:
            loaded |= getattr(self, name).load_adapter()
        # What the engine holds, before vLLM's CPU repacking empties the linear weights:
        # with LoRA ARMs, the base's bytes plus the adapters' (tests/test_lora_arm.py).
        self.loaded_parameter_bytes = lora_arm.parameter_bytes(self)
        return loaded
