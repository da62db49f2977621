"""vLLM plugin entry point (group `vllm.general_plugins`): runs in every vLLM process.

It registers the composite architecture and a config hook for it, so that plain
`vllm serve BUNDLE` and `vllm.LLM(BUNDLE)` get what `genarm-vllm serve` and `GuidedLLM` get:
the GenARM logits processor, per-request guidance checked at admission (HTTP 400), and
prompts refused when they hold an id some reward model cannot embed.

Why a per-architecture config hook and not the `vllm.logits_processors` entry point: an
entry-point processor is loaded for every model vLLM serves (and its import can fail their
start), while the hook (vllm/model_executor/models/config.py MODELS_CONFIG_MAP, run by
VllmConfig.__post_init__ in every frontend, vLLM 0.32 and 0.33 alike) runs for
GenARMForCausalLM only: installing this package changes nothing for other models.
"""

from __future__ import annotations

import functools
import logging

from vllm.exceptions import VLLMValidationError

logger = logging.getLogger(__name__)


class PromptIdError(VLLMValidationError, ValueError):
    """A prompt id some reward model cannot embed: HTTP 400 in vLLM's server, and a
    ValueError in Python, as GuidedLLM's other errors are."""


def register() -> None:
    from vllm import ModelRegistry

    from genarm_vllm.guidance import ARCHITECTURE

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # By name, so the class (and its vLLM imports) load only where the model is built.
        ModelRegistry.register_model(ARCHITECTURE, "genarm_vllm.engine.model:GenARMForCausalLM")
    try:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    except ImportError:  # a vLLM without per-architecture config hooks
        logger.error(
            "genarm-vllm: this vLLM has no MODELS_CONFIG_MAP; GenARM models with K reward "
            "models need --logits-processors "
            "genarm_vllm.engine.logits_processor:GenARMLogitsProcessor_<K>rm_v1 (_v2 under "
            "Model Runner V2)"
        )
        return
    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, GenARMConfigHook)
    _cap_carrier_block_hashes()


class GenARMConfigHook:
    """vLLM's per-architecture config hook for GenARMForCausalLM (the interface of
    vllm/model_executor/models/config.py VerifyAndUpdateConfig)."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from genarm_vllm.engine.logits_processor import is_genarm_processor, processor_for
        from genarm_vllm.engine.validation import (
            check_chat_templates,
            check_engine_features,
            own_chat_template_models,
            prompt_id_limits,
        )
        from genarm_vllm.guidance import GuidanceConfig

        model_config = vllm_config.model_config
        parallel = vllm_config.parallel_config
        check_engine_features(vllm_config.speculative_config, parallel.pipeline_parallel_size)
        guidance = GuidanceConfig.from_hf_config(model_config.hf_config)
        reward_models = guidance.reward_models
        # Plain `vllm serve BUNDLE` starts here: refuse a reward model without a chat
        # template before serving, as GuidedLLM and `genarm-vllm serve` do.
        check_chat_templates(reward_models, guidance.own_chat_templates)
        # Ours first, once: a user's own GenARMLogitsProcessor entry is replaced, not doubled.
        others = [p for p in model_config.logits_processors or [] if not is_genarm_processor(p)]
        v2_runner = bool(getattr(vllm_config, "use_v2_model_runner", False))
        model_config.logits_processors = [processor_for(len(reward_models), v2_runner), *others]
        # Read by the prompt check below in the frontend process (pickled along with the config).
        model_config.genarm_prompt_id_limits = prompt_id_limits(
            model_config.model, reward_models, model_config.tokenizer
        )
        _check_prompt_ids_at_admission()
        _carrier_requests_at_admission()
        if guidance.own_chat_templates:
            # Read by the chat hook below, in the server's process.
            model_config.genarm_chat_template_models = own_chat_template_models(
                reward_models, True)
            _chat_prompts_at_admission()


def _check_prompt_ids_at_admission() -> None:
    """Make vLLM's prompt-id check also refuse ids a reward model cannot embed.

    vLLM has no per-model hook for prompt validation; every frontend checks prompt ids in
    BaseRenderer.validate_token_ids (vllm/renderers/base.py, called by
    v1/engine/input_processor.py for text, chat and token prompts alike), whose
    VLLMValidationError is HTTP 400 in the server and a ValueError in vllm.LLM. This wraps
    it, once per process; models without GenARM limits pass straight through.
    """
    from vllm.renderers.base import BaseRenderer

    from genarm_vllm.engine.validation import check_prompt_ids

    vllm_check = BaseRenderer.validate_token_ids
    if getattr(vllm_check, "checks_genarm_limits", False):
        return

    @functools.wraps(vllm_check)
    def validate_token_ids(self, token_ids, *, parameter=None):
        vllm_check(self, token_ids, parameter=parameter)
        limits = getattr(self.model_config, "genarm_prompt_id_limits", None)
        if limits and token_ids:
            try:
                check_prompt_ids(token_ids, limits)
            except ValueError as e:
                raise PromptIdError(str(e), parameter=parameter) from None

    validate_token_ids.checks_genarm_limits = True
    BaseRenderer.validate_token_ids = validate_token_ids


def _carrier_requests_at_admission() -> None:
    """Make vLLM's frontend turn requests whose `genarm_prompts` (vllm_xargs / extra_args)
    give models prompts of their own into carrier requests (engine/carrier.py).

    Every frontend (vllm.LLM, LLMEngine, AsyncLLM and so the OpenAI server) builds its
    EngineCoreRequest in InputProcessor.process_inputs (v1/engine/input_processor.py), after
    rendering and checking the base's prompt; this wraps it, once per process (its async
    variant is bound to the instance's process_inputs at construction). Bad prompts are a
    VLLMValidationError: HTTP 400 in the server, a ValueError in Python.
    """
    from vllm.v1.engine.input_processor import InputProcessor

    from genarm_vllm.engine.carrier import carrier_engine_request

    vllm_process = InputProcessor.process_inputs
    if getattr(vllm_process, "makes_genarm_carriers", False):
        return

    @functools.wraps(vllm_process)
    def process_inputs(self, *args, **kwargs):
        request = vllm_process(self, *args, **kwargs)
        if getattr(self.model_config, "genarm_prompt_id_limits", None) is not None:
            try:
                carrier_engine_request(self.model_config, request,
                                       self.vllm_config.cache_config.block_size)
            except ValueError as e:
                raise PromptIdError(str(e), parameter="vllm_xargs.genarm_prompts") from None
        return request

    process_inputs.makes_genarm_carriers = True
    InputProcessor.process_inputs = process_inputs


def with_chat_prompts(extra: dict | None, messages, renders_own: list[bool]) -> dict | None:
    """`extra` (a request's vllm_xargs / SamplingParams.extra_args) plus `genarm_prompts`
    giving the chat `messages` ("json:" + messages) to every model that renders chats with
    its own template, "<base>" to the others; None when `extra` gives genarm_prompts itself
    or no model renders its own. ValueError for content a chat template cannot read."""
    import json

    from genarm_vllm.prompts import (
        BASE_PROMPT_SENTINEL,
        JSON_PREFIX,
        PROMPTS_KEY,
        chat_prompts,
        text_messages,
    )

    if PROMPTS_KEY in (extra or {}):
        return None
    entries = chat_prompts(text_messages(messages), renders_own)
    if entries is None:
        return None
    chat = JSON_PREFIX + json.dumps(entries[renders_own.index(True)])
    return {**(extra or {}),
            PROMPTS_KEY: [BASE_PROMPT_SENTINEL if e is None else chat for e in entries]}


def _chat_prompts_at_admission() -> None:
    """Make chat requests give their messages to every reward model that renders them with
    its own chat template (genarm_own_chat_templates), as `genarm_prompts`
    (with_chat_prompts), unless a request sets genarm_prompts itself; the carrier hook
    above then renders and checks them. Models without the option pass straight through.
    Wrapped once per process, in vLLM 0.32 and 0.33 alike:

    - the server: every chat endpoint (/v1/chat/completions and its batch form, and the
      Anthropic and Cohere ones, which convert to chat requests) renders the base's prompt
      in OnlineRenderer.preprocess_chat (vllm/renderers/online_renderer.py); the request's
      vllm_xargs become its SamplingParams.extra_args only afterwards (to_sampling_params,
      vllm/entrypoints/openai/chat_completion/protocol.py);
    - `vllm.LLM.chat` / `enqueue_chat`: both pass the conversations and their
      SamplingParams to OfflineInferenceMixin._add_chat_requests
      (vllm/entrypoints/common/offline.py) before rendering them.
    """
    from vllm import SamplingParams
    from vllm.entrypoints.common.offline import OfflineInferenceMixin
    from vllm.renderers.inputs.preprocess import conversation_to_seq
    from vllm.renderers.online_renderer import OnlineRenderer

    vllm_preprocess = OnlineRenderer.preprocess_chat
    if not getattr(vllm_preprocess, "gives_genarm_chat_prompts", False):
        @functools.wraps(vllm_preprocess)
        async def preprocess_chat(self, request, messages, *args, **kwargs):
            renders_own = getattr(self.model_config, "genarm_chat_template_models", None)
            if renders_own and hasattr(request, "vllm_xargs"):
                try:
                    xargs = with_chat_prompts(request.vllm_xargs, messages, renders_own)
                except ValueError as e:
                    raise PromptIdError(str(e), parameter="messages") from None
                if xargs is not None:
                    request.vllm_xargs = xargs
            return await vllm_preprocess(self, request, messages, *args, **kwargs)

        preprocess_chat.gives_genarm_chat_prompts = True
        OnlineRenderer.preprocess_chat = preprocess_chat

    vllm_add_chat = OfflineInferenceMixin._add_chat_requests
    if not getattr(vllm_add_chat, "gives_genarm_chat_prompts", False):
        @functools.wraps(vllm_add_chat)
        def add_chat_requests(self, messages, params, *args, **kwargs):
            renders_own = getattr(self.model_config, "genarm_chat_template_models", None)
            if renders_own:
                conversations = conversation_to_seq(messages)
                params = list(self._params_to_seq(params, len(conversations)))
                for i, (conversation, p) in enumerate(zip(conversations, params)):
                    if isinstance(p, SamplingParams):
                        extra = with_chat_prompts(p.extra_args, conversation, renders_own)
                        if extra is not None:
                            params[i] = p.clone()
                            params[i].extra_args = extra
            return vllm_add_chat(self, messages, params, *args, **kwargs)

        add_chat_requests.gives_genarm_chat_prompts = True
        OfflineInferenceMixin._add_chat_requests = add_chat_requests


def _cap_carrier_block_hashes() -> None:
    """Make vLLM's prefix cache share a carrier request's blocks only up to its
    `CarrierLayout.cacheable_tokens()` (genarm_vllm/prompts.py).

    Past that row a model's KV slots hold its last prompt token and its response tokens,
    which the block hashes (the carrier's ids and salt) do not cover. Those blocks get
    hashes private to the request (its request id: a preempted request still finds its
    own blocks), so no other request ever hits them. vLLM needs a hash for every full
    block (BlockPool.cache_full_blocks), so they are replaced, not dropped. The EngineCore
    builds every Request's hasher with get_request_block_hasher(hash_block_size,
    caching_hash_fn, ...), looked up in vllm/v1/engine/core.py when EngineCore starts,
    after load_general_plugins (vLLM 0.32 and 0.33 alike; the hasher itself is in
    vllm/v1/core/kv_cache_utils.py). Requests without genarm_carrier are untouched.
    """
    from vllm.v1.engine import core

    from genarm_vllm.prompts import CARRIER_KEY, CarrierLayout

    vllm_factory = core.get_request_block_hasher
    if getattr(vllm_factory, "caps_genarm_carriers", False):
        return

    @functools.wraps(vllm_factory)
    def get_request_block_hasher(hash_block_size, caching_hash_fn, *args, **kwargs):
        vllm_hasher = vllm_factory(hash_block_size, caching_hash_fn, *args, **kwargs)

        def request_block_hasher(request):
            hashes = vllm_hasher(request)
            params = request.sampling_params
            info = (params.extra_args or {}).get(CARRIER_KEY) if params is not None else None
            if info is None or not hashes:
                return hashes
            try:
                shared = CarrierLayout(request.num_prompt_tokens, info).cacheable_tokens()
            except (KeyError, TypeError, ZeroDivisionError):  # refused at admission
                shared = 0
            first = len(request.block_hashes)
            return [
                h if (first + i + 1) * hash_block_size <= shared
                else caching_hash_fn(("genarm-carrier-private", request.request_id, first + i))
                for i, h in enumerate(hashes)
            ]

        return request_block_hasher

    get_request_block_hasher.caps_genarm_carriers = True
    core.get_request_block_hasher = get_request_block_hasher
