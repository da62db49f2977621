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
