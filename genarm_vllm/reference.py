"""A batched Hugging Face transformers GenARM decoder: the correctness oracle.

Same semantics as the engine: every model keeps its own KV cache and reads its own
prompt (the base's, unless a request's guidance gives it one: "prompts", see
genarm_vllm/prompts.py) followed by the shared response tokens, with its own positions
from 0; the next-token scores are `mix_logits(...)`; temperature, top-k and top-p
act on the mixed scores (official GenARM code). Prompts are left-padded; each row stops
at EOS (which is kept in the output, as vLLM does) or after max_new_tokens.
With batch_size=1 this is how the official GenARM code runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from genarm_vllm.engine.validation import check_reward_models, tokenizer_length
from genarm_vllm.guidance import SELF_MODEL, check_guidance, resolve_guidance
from genarm_vllm.mixing import mix_logits
from genarm_vllm.prompts import check_prompts, encode_prompts


def _is_adapter(path: str) -> bool:
    from genarm_vllm.engine.lora_adapter import is_lora_adapter

    return is_lora_adapter(path)


def top_k_top_p_filter(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask scores outside the top-k / nucleus top-p set with -inf (row-wise)."""
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -torch.inf)
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; keep the first.
        drop_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= top_p
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, -torch.inf)
    return scores


class ReferenceDecoder:
    """GenARM decoding with transformers models, batched, one KV cache per model."""

    def __init__(
        self,
        base: str,
        reward_models: Sequence[str] = (),
        *,
        beta: float = 1.0,
        weights: Sequence[float] | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        self.reward_model_paths = [str(p) for p in reward_models]
        if self.reward_model_paths:
            check_reward_models(str(base), self.reward_model_paths)
        if weights is None:
            weights = [1.0] * len(self.reward_model_paths)
        self.beta, self.weights = check_guidance(beta, weights, len(self.reward_model_paths))
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.vocab_size = tokenizer_length(str(base))

        def load(path: str) -> torch.nn.Module:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            return model.to(self.device).eval()

        self.base = load(str(base))
        # "self": the base itself as a guiding model (its own KV cache here too).
        self.reward_models = [self.base if p == SELF_MODEL else load(p)
                              for p in self.reward_model_paths]
        self.reward_tokenizers = [
            self.tokenizer if p == SELF_MODEL or _is_adapter(p) else AutoTokenizer.from_pretrained(p)
            for p in self.reward_model_paths
        ]
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        )

    def _encode(self, prompt: str | Sequence[int] | dict) -> list[int]:
        if isinstance(prompt, dict):
            prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids
        return [int(t) for t in prompt]

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str | Sequence[int] | dict],
        max_new_tokens: int = 32,
        *,
        guidance: object = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
        batch_size: int | None = None,
        repetition_penalty: float = 1.0,
    ) -> list[list[int]]:
        """Generated token ids per prompt (EOS included when it ends a row).

        `guidance` is as in `GuidedLLM.generate`: None, one dict, or one per prompt.
        temperature 0 means greedy (argmax of the mixed scores).
        repetition_penalty: as vLLM applies it, on the mixed scores of every token seen in
        the prompt or the output so far (positive scores divided by it, others multiplied).
        """
        if not (repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty!r}")
        prompt_ids = [self._encode(p) for p in prompts]
        own_prompts = self._own_prompts(guidance, len(prompt_ids))
        per_prompt = [
            g or (self.beta, self.weights)
            for g in resolve_guidance(guidance, len(prompt_ids), self.beta, self.weights)
        ]
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        batch_size = batch_size or len(prompt_ids) or 1
        outputs: list[list[int]] = []
        for start in range(0, len(prompt_ids), batch_size):
            outputs += self._generate_batch(
                prompt_ids[start : start + batch_size],
                own_prompts[start : start + batch_size],
                per_prompt[start : start + batch_size],
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                generator,
                ignore_eos,
                repetition_penalty,
            )
        return outputs

    def _own_prompts(self, guidance, num_prompts) -> list[list[list[int] | None]]:
        """Per prompt, per reward model: its own prompt ids, or None (the base's prompt)."""
        num_models = len(self.reward_models)
        if guidance is None or isinstance(guidance, dict):
            guidance = [guidance] * num_prompts
        result = []
        for i, item in enumerate(guidance):
            entries = (item or {}).get("prompts") if isinstance(item, dict) else None
            if entries is None:
                result.append([None] * num_models)
                continue
            entries = check_prompts(entries, num_models, f"guidance[{i}]['prompts']")
            result.append(encode_prompts(entries, self.reward_tokenizers, [None] * num_models,
                                         f"guidance[{i}]['prompts']"))
        return result

    def _generate_batch(
        self, prompt_ids, own_prompts, guidance, max_new_tokens, temperature, top_k, top_p,
        generator, ignore_eos, repetition_penalty,
    ) -> list[list[int]]:
        rows = len(prompt_ids)
        models = [self.base, *self.reward_models]
        # Each model's own left-padded prompts, attention mask and (later) positions.
        inputs, masks = [], []
        for m in range(len(models)):
            ids_m = [prompt_ids[i] if m == 0 or own_prompts[i][m - 1] is None
                     else own_prompts[i][m - 1] for i in range(rows)]
            longest = max(len(p) for p in ids_m)
            input_ids = torch.full((rows, longest), self.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((rows, longest), dtype=torch.long)
            for i, ids in enumerate(ids_m):  # left padding
                input_ids[i, longest - len(ids) :] = torch.tensor(ids)
                attention_mask[i, longest - len(ids) :] = 1
            inputs.append(input_ids.to(self.device))
            masks.append(attention_mask.to(self.device))
        beta = torch.tensor([b for b, _ in guidance], device=self.device)
        weights = torch.tensor([w for _, w in guidance], device=self.device).reshape(
            rows, len(self.reward_models)
        )

        caches: list = [None] * len(models)
        outputs: list[list[int]] = [[] for _ in range(rows)]
        finished = torch.zeros(rows, dtype=torch.bool, device=self.device)
        step_ids = None  # None: each model's own prompt
        seen = None  # [rows, width] tokens seen so far, for the repetition penalty
        for _ in range(max_new_tokens):
            logits = []
            for m, model in enumerate(models):
                ids = inputs[m] if step_ids is None else step_ids
                attention_mask = masks[m]
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
                position_ids = position_ids[:, -ids.shape[1] :]
                out = model(
                    input_ids=ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=caches[m],
                    use_cache=True,
                )
                caches[m] = out.past_key_values
                logits.append(out.logits[:, -1, :])
            scores = mix_logits(logits[0], logits[1:], beta, weights, self.vocab_size)
            if repetition_penalty != 1.0:
                if seen is None:  # the prompt's ids, without the left padding
                    seen = torch.zeros_like(scores, dtype=torch.bool)
                    for i, ids in enumerate(prompt_ids):
                        seen[i, torch.tensor(ids, device=self.device)] = True
                penalized = torch.where(scores > 0, scores / repetition_penalty,
                                        scores * repetition_penalty)
                scores = torch.where(seen, penalized, scores)
            next_ids = self._pick(scores, temperature, top_k, top_p, generator)
            for i in range(rows):
                if not finished[i]:
                    outputs[i].append(int(next_ids[i]))
            if seen is not None:
                seen[torch.arange(rows, device=self.device), next_ids] = True
            if not ignore_eos and self.eos_token_id is not None:
                finished |= next_ids == self.eos_token_id
            if bool(finished.all()):
                break
            step_ids = next_ids.unsqueeze(-1)
            ones = torch.ones((rows, 1), dtype=torch.long, device=self.device)
            masks = [torch.cat([mask, ones], dim=-1) for mask in masks]
        return outputs

    @staticmethod
    def _pick(scores, temperature, top_k, top_p, generator) -> torch.Tensor:
        if temperature == 0:
            return scores.argmax(dim=-1)
        scores = top_k_top_p_filter(scores / temperature, top_k, top_p)
        return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)
