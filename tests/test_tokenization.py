"""The tokenization contract (tokenization.py) is how vLLM itself encodes prompts."""

import pytest
from vllm import SamplingParams

from genarm_vllm.tokenization import prompt_ids, response_ids, user_message

ONE_TOKEN = SamplingParams(temperature=0, max_tokens=1)


def test_plain_and_chat_prompts_encode_as_vllm_does(engine):
    llm = engine("arm_small", ["arm_small"], beta=0.5)
    tokenizer = llm.get_tokenizer()
    prompt = "the cat sat on"
    # A string prompt: vLLM's generate() adds the tokenizer's special tokens, if any.
    served = llm.llm.generate([prompt], ONE_TOKEN, use_tqdm=False)[0]
    assert prompt_ids(tokenizer, prompt) == served.prompt_token_ids
    # Chat messages: vLLM's chat path renders the template and adds nothing on top.
    messages = user_message(prompt)
    chatted = llm.llm.chat([messages], ONE_TOKEN, use_tqdm=False)[0]
    assert prompt_ids(tokenizer, messages=messages) == chatted.prompt_token_ids


def test_response_ends_with_eos_and_bad_calls_say_why(engine):
    tokenizer = engine("arm_small", ["arm_small"], beta=0.5).get_tokenizer()
    ids = response_ids(tokenizer, "on the mat")
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.bos_token_id not in ids
    with pytest.raises(ValueError, match="exactly one of prompt"):
        prompt_ids(tokenizer, "x", messages=user_message("x"))
    with pytest.raises(ValueError, match="exactly one of prompt"):
        prompt_ids(tokenizer)
