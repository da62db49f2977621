from genarm_vllm import runtime

# Before vLLM or torch is imported: one OpenMP thread, in-process engines, 1 GiB of KV
# cache per engine, no model hub (runtime.LOCAL_ENV).
runtime.use_local_env()

import pytest  # noqa: E402

from genarm_vllm.testing import build_tiny_family  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of the tiny base and reward models (see genarm_vllm.testing)."""
    return build_tiny_family(tmp_path_factory.mktemp("tiny"))


# Deleting an in-process vLLM engine breaks the others of the process ("pipeline model
# parallel group is not initialized"): every engine a test needs is built once and kept
# for the session.
_ENGINES: dict = {}

TEST_ENGINE_ARGS = dict(enforce_eager=True, max_model_len=256, dtype="float32")


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

                reward_paths = reward_paths or [tiny[a] for a in arms]
                _ENGINES[key] = GuidedLLM(base or tiny["base"], reward_paths, **kwargs)
        return _ENGINES[key]

    return get
