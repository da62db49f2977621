"""GuidedLLM: offline batch generation with GenARM guidance on a vLLM engine."""

from __future__ import annotations

import os
from collections.abc import Sequence

from genarm_vllm.engine.defaults import engine_defaults, use_single_process_on_cpu
from genarm_vllm.engine.validation import (
    check_reward_models,
    own_chat_template_models,
    prompt_id_limits,
)
from genarm_vllm.guidance import (
    genarm_fields,
    request_guidance,
    resolve_guidance,
    resolve_prompts,
    with_guidance,
)


class GuidedLLM:
    """A vLLM engine whose every request is guided by GenARM reward models.

    Args:
        base: the base model folder, or a bundle folder written by `genarm-vllm pack`
            (then reward_models / beta / weights default to the bundle's).
        reward_models: reward model (ARM) folders; they must share the base's tokenizer.
        beta: default beta (> 0): smaller means stronger guidance.
        weights: default weight per reward model (None: 1.0 each).
        own_chat_templates: True: in chat requests (`chat`, batch-job rows with "messages")
            each reward model renders the messages with its own tokenizer's chat template
            instead of reading the base's rendering (None: the bundle's setting, else False).
        **vllm_engine_kwargs: anything `vllm.LLM` takes (max_model_len, tensor_parallel_size,
            enforce_eager, gpu_memory_utilization, ...). Defaults differ from vLLM's
            (see engine.defaults.engine_defaults): logprobs_mode="processed_logprobs", so returned
            logprobs are each request's own guided distribution; max_model_len at most
            every reward model's maximum positions; and on a machine without a GPU
            dtype="float32", enable_chunked_prefill=False and a KV cache of a quarter
            of the available memory.
    """

    def __init__(
        self,
        base: str | os.PathLike,
        reward_models: Sequence[str | os.PathLike] | None = None,
        beta: float | None = None,
        weights: Sequence[float] | None = None,
        own_chat_templates: bool | None = None,
        **vllm_engine_kwargs,
    ):
        from vllm import LLM

        base = str(base)
        self.base = base
        self.engine_kwargs = dict(vllm_engine_kwargs)  # as given (batch-job fingerprints)
        fields, guidance = genarm_fields(base, reward_models, beta, weights, own_chat_templates)
        self.reward_models, self.beta, self.weights = (
            guidance.reward_models, guidance.beta, guidance.weights
        )
        self.own_chat_templates = guidance.own_chat_templates
        # Per reward model: renders chat requests with its own chat template.
        self.chat_template_models = own_chat_template_models(
            self.reward_models, self.own_chat_templates)
        # Fail here, with a clear message, rather than inside the engine process.
        check_reward_models(
            base,
            self.reward_models,
            tokenizer=vllm_engine_kwargs.get("tokenizer"),
            max_model_len=vllm_engine_kwargs.get("max_model_len"),
            tensor_parallel_size=vllm_engine_kwargs.get("tensor_parallel_size", 1),
            speculative_config=vllm_engine_kwargs.get("speculative_config"),
            pipeline_parallel_size=vllm_engine_kwargs.get("pipeline_parallel_size", 1),
            own_chat_templates=self.own_chat_templates,
        )
        # Models that cannot embed every id vLLM takes in a prompt for this base (vLLM's
        # prompt check refuses such prompts; batch jobs check them before submitting).
        self.prompt_id_limits = prompt_id_limits(
            base, self.reward_models, vllm_engine_kwargs.get("tokenizer")
        )

        kwargs = dict(vllm_engine_kwargs)
        kwargs["hf_overrides"] = {**(kwargs.get("hf_overrides") or {}), **fields}
        # The plugin adds the GenARM logits processor (genarm_vllm/engine/plugin.py).
        kwargs.update(engine_defaults(base, self.reward_models, kwargs))  # what the user left unset
        use_single_process_on_cpu(kwargs)
        self.llm = LLM(model=base, **kwargs)

    def get_tokenizer(self):
        return self.llm.get_tokenizer()

    def generate(
        self,
        prompts,
        sampling_params=None,
        guidance: object = None,
        use_tqdm: bool = True,
    ):
        """Generate for `prompts` (anything vllm.LLM.generate takes) in prompt order.

        guidance: None (engine defaults), one dict {"beta": ..., "weights": [...]} for all
        prompts, or a list with one such dict (or None) per prompt. A dict may carry
        "prompts": one entry per reward model (None: the base's prompt; a string; token
        ids; chat messages), the prompt that model reads (genarm_vllm/prompts.py). The
        outputs of such requests report the base's prompt (prompt, prompt_token_ids);
        num_cached_tokens counts the engine's whole scheduled prompt.
        sampling_params: one vllm.SamplingParams for all prompts, or one per prompt.
        """
        from vllm import SamplingParams

        single = isinstance(prompts, (str, dict))
        prompt_list = [prompts] if single else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompt_list)
        if len(sampling_params) != len(prompt_list):
            raise ValueError(
                f"got {len(sampling_params)} sampling params for {len(prompt_list)} prompts"
            )
        for sp in sampling_params:  # guidance given directly in extra_args
            request_guidance(sp, len(self.reward_models))
        per_prompt = resolve_guidance(guidance, len(prompt_list), self.beta, self.weights)
        params = [
            sp if g is None else with_guidance(sp, *g)
            for sp, g in zip(sampling_params, per_prompt)
        ]
        own = resolve_prompts(guidance, len(prompt_list), len(self.reward_models))
        restore = {}
        if any(e is not None for e in own):
            from genarm_vllm.engine.carrier import carrier_requests

            prompt_list, params, restore = carrier_requests(self, prompt_list, params, own)
        from vllm.exceptions import VLLMValidationError

        try:
            outputs = self.llm.generate(prompt_list, params, use_tqdm=use_tqdm)
        except VLLMValidationError as e:  # vLLM's admission checks (ours among them)
            if isinstance(e, ValueError):
                raise
            raise ValueError(str(e)) from e
        for i, (prompt, prompt_ids) in restore.items():  # report the base's prompt
            outputs[i].prompt = prompt
            outputs[i].prompt_token_ids = prompt_ids
        return outputs

    def chat(
        self,
        messages,
        sampling_params=None,
        guidance: object = None,
        use_tqdm: bool = True,
    ):
        """Generate replies to one conversation (a list of {"role", "content"} dicts) or a
        list of conversations, in order; arguments otherwise as `generate`.

        The base reads each conversation rendered as vLLM's chat renderer renders it (its
        tokenizer's chat template, generation prompt added, tokenized without adding
        special tokens). Under own_chat_templates, each reward model not on the base's
        weights renders it with its own chat template, unless the conversation's guidance
        gives "prompts" itself.
        """
        from genarm_vllm.prompts import is_chat
        from genarm_vllm.tokenization import chat_text

        conversations = [messages] if is_chat(messages) else list(messages)
        tokenizer = self.get_tokenizer()
        prompts = []
        for conversation in conversations:
            text = chat_text(tokenizer, [dict(m) for m in conversation])
            ids = tokenizer(text, add_special_tokens=False).input_ids
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        if self.own_chat_templates:
            guidance = self.chat_guidance(guidance, conversations)
        return self.generate(prompts, sampling_params, guidance, use_tqdm)

    def chat_guidance(self, guidance: object, conversations: list) -> object:
        """`guidance` (as generate takes it) with, per conversation, "prompts" giving the
        conversation to every reward model that renders it with its own chat template;
        a conversation whose guidance gives "prompts" keeps them."""
        from genarm_vllm.prompts import chat_prompts

        if guidance is None or isinstance(guidance, dict):
            guidance = [guidance] * len(conversations)
        if not isinstance(guidance, Sequence) or len(guidance) != len(conversations):
            return guidance  # generate() names the problem
        result = []
        for item, conversation in zip(guidance, conversations):
            own = chat_prompts(conversation, self.chat_template_models)
            if own is not None and (item is None or isinstance(item, dict)
                                    and item.get("prompts") is None):
                item = {**(item or {}), "prompts": own}
            result.append(item)
        return result

    def reward_tokenizers(self) -> list:
        """Each reward model's tokenizer (the base's for "self" and LoRA reward models)."""
        if getattr(self, "_reward_tokenizers", None) is None:
            from transformers import AutoTokenizer

            from genarm_vllm.engine.validation import on_base_weights

            base = self.llm.get_tokenizer()
            self._reward_tokenizers = [
                base if on_base_weights(m) else AutoTokenizer.from_pretrained(m)
                for m in self.reward_models
            ]
        return self._reward_tokenizers

    def reward_embedding_rows(self) -> list[int]:
        from genarm_vllm.engine.validation import embedding_rows, on_base_weights

        return [embedding_rows(self.base if on_base_weights(m) else m) for m in self.reward_models]
