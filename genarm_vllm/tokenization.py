"""How prompts and responses become token ids: one contract for training and decoding.

An ARM scores responses in the context it was trained in, so training (`train-arm`), the
batch job, the demo and the tests all encode through these functions:

    prompt ids    a plain prompt string: tokenized with the tokenizer's own special tokens
                  (e.g. BOS), as vLLM's generate() does for a string prompt; chat messages:
                  the tokenizer's chat template rendered with add_generation_prompt=True and
                  tokenized WITHOUT adding special tokens (the template holds them), as
                  vLLM's chat path does;
    response ids  the response tokenized on its own, without special tokens, then EOS (so
                  an ARM also scores where responses end).

The response is tokenized apart from the prompt, as the base generates it: any separating
space or newline belongs at the end of the prompt or the start of the response.
"""

from __future__ import annotations


def user_message(prompt: str) -> list[dict]:
    """A plain prompt as the one user message of a chat."""
    return [{"role": "user", "content": prompt}]


def prompt_ids(tokenizer, prompt: str | None = None, messages: list | None = None) -> list[int]:
    """Token ids of a plain `prompt` or of chat `messages` (exactly one of the two)."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt (a string) or messages (a chat)")
    if messages is None:
        return tokenizer(prompt).input_ids
    return tokenizer(chat_text(tokenizer, messages), add_special_tokens=False).input_ids


def chat_text(tokenizer, messages: list) -> str:
    """Chat `messages` rendered with the tokenizer's chat template, generation prompt added."""
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer of {tokenizer.name_or_path} has no chat template")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def response_ids(tokenizer, response: str) -> list[int]:
    """Token ids of a response as the model generates it, ending with EOS."""
    return tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
