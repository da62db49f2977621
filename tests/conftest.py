import os

# vLLM on this CPU: one OpenMP thread, in-process engine, float32 (see README).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from genarm_vllm.testing import build_tiny_family  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of the tiny base and reward models (see genarm_vllm.testing)."""
    return build_tiny_family(tmp_path_factory.mktemp("tiny"))


# In-process vLLM engines cannot be torn down safely while another one lives (see
# README, testing notes): every engine a test needs is built once and kept for the session.
_ENGINES: dict = {}

ENGINE_DEFAULTS = dict(enforce_eager=True, max_model_len=256, dtype="float32")


@pytest.fixture(scope="session")
def engine(tiny):
    """engine(key, arms=[tiny names], **kwargs) -> a GuidedLLM cached for the session.

    plain=True gives a plain vllm.LLM (model= defaults to the tiny base); base= and
    reward_paths= take model folders other than the tiny family.
    """

    def get(key, arms=(), plain=False, base=None, reward_paths=None, **kwargs):
        if key not in _ENGINES:
            kwargs = {**ENGINE_DEFAULTS, **kwargs}
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
