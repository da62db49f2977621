from genarm_vllm import runtime

# Before vLLM or torch is imported: one OpenMP thread, in-process engines, 1 GiB of KV
# cache per engine, no model hub (runtime.LOCAL_ENV).
runtime.use_local_env()

import pytest  # noqa: E402

from genarm_vllm.testing import (  # noqa: E402
    build_model,
    build_tiny_family,
    build_tokenizer,
    record_loaded_parameter_bytes,
    with_added_tokens,
)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of the tiny base and reward models (see genarm_vllm.testing)."""
    return build_tiny_family(tmp_path_factory.mktemp("tiny"))


# Deleting an in-process vLLM engine breaks the others of the process ("pipeline model
# parallel group is not initialized"): every engine a test needs is built once and kept
# for the session.
_ENGINES: dict = {}

# 128 MiB of KV cache each (the tiny models need a few MiB): the session keeps every engine
# alive, and at LOCAL_ENV's 1 GiB apiece they crowded out the subprocess tests' engines.
TEST_ENGINE_ARGS = dict(enforce_eager=True, max_model_len=256, dtype="float32",
                        kv_cache_memory_bytes=128 << 20)


@pytest.fixture(scope="session")
def engine(tiny):
    """engine(key, arms=[tiny names], **kwargs) -> a GuidedLLM cached for the session.

    plain=True gives a plain vllm.LLM (model= defaults to the tiny base); base= and
    reward_paths= take model folders other than the tiny family.
    """

    def get(key, arms=(), plain=False, base=None, reward_paths=None, **kwargs):
        if key not in _ENGINES:
            kwargs = {**TEST_ENGINE_ARGS, **kwargs}
            if plain:
                from vllm import LLM

                model = kwargs.pop("model", str(base or tiny["base"]))
                _ENGINES[key] = LLM(model=model, **kwargs)
            else:
                from genarm_vllm import GuidedLLM

                record_loaded_parameter_bytes()  # for tests of weight memory

                reward_paths = reward_paths or [tiny[a] for a in arms]
                _ENGINES[key] = GuidedLLM(base or tiny["base"], reward_paths, **kwargs)
        return _ENGINES[key]

    return get


@pytest.fixture(scope="session")
def padded_pair(tmp_path_factory):
    """The paper's weak-to-strong layout and its mirror image, on the tiny tokenizer:
    tok_plus = the base's tokenizer + one added special token at the end (the Tulu2 ARM's
    `<pad>`, id 32000, next to its base's 32,000 tokens); embeddings sized to each tokenizer."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("padded")
    tok = build_tokenizer(root / "tok")
    tok_plus = with_added_tokens(root / "tok", root / "tok_plus", ("<extra_pad>",))
    extra_id = len(tok)
    assert tok_plus.convert_tokens_to_ids("<extra_pad>") == extra_id
    models = {
        "base": build_model(root / "base", tok, seed=1),
        "arm_plus": build_model(root / "arm_plus", tok_plus, seed=2),  # Tulu2 ARM layout
        "base_plus": build_model(root / "base_plus", tok_plus, seed=1),
        "arm": build_model(root / "arm", tok, seed=2),
    }
    # base_plus prefers the added id above all others: the engine must still never pick it.
    weights_file = models["base_plus"] / "model.safetensors"
    weights = load_file(weights_file)
    weights["lm_head.weight"][extra_id] = weights["lm_head.weight"].sum(0)
    save_file(weights, weights_file, metadata={"format": "pt"})
    return models, extra_id


@pytest.fixture(scope="session")
def chat_arm(tmp_path_factory):
    """An ARM on the tiny tokenizer with a chat template of its own (PKU style)."""
    root = tmp_path_factory.mktemp("chat_arm")
    tokenizer = build_tokenizer(root / "tok")
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}we see {{ m['content'] }} "
        "{% endif %}{% endfor %}{% if add_generation_prompt %}it is{% endif %}"
    )
    return build_model(root / "arm", tokenizer, seed=7)
