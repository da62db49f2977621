"""Code for vLLM 0.33 on GPUs, tested against its interfaces here (no GPU on these machines)."""

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from genarm_vllm import GuidedLLM
from genarm_vllm.engine.attention_backend import choose_attention_backend, use_safe_attention_backend
from genarm_vllm.engine.configs import head_size


def test_attention_backend_is_safe_for_every_head_size():
    # Reward models with head sizes at most the base's (padded to powers of two): vLLM's choice.
    assert choose_attention_backend(128, [64, 128, 96], "float32", None) is None
    # A larger ARM head size: TRITON_ATTN would write past its base-sized decode buffer.
    assert choose_attention_backend(64, [128], "bfloat16", None) == "FLASH_ATTN"
    assert choose_attention_backend(64, [128], "float16", "auto") == "FLASH_ATTN"
    assert choose_attention_backend(64, [128], "bfloat16", "FLASHINFER") is None  # user's, safe
    with pytest.raises(ValueError, match="TRITON_ATTN backend does not support"):
        choose_attention_backend(64, [128], "bfloat16", "TRITON_ATTN")
    # float32 on CUDA: only Triton runs it, so refuse and name the fix.
    with pytest.raises(ValueError, match="run in bfloat16 or float16"):
        choose_attention_backend(64, [128], "float32", None)
    with pytest.raises(ValueError, match="FLASH_ATTN cannot run"):
        choose_attention_backend(64, [36 * 8 + 4], "bfloat16", None)  # not a multiple of 8


def test_backend_is_set_on_the_config_the_layers_read(tiny):
    from transformers import AutoConfig

    base = AutoConfig.from_pretrained(tiny["base"])  # head size 32
    arm = AutoConfig.from_pretrained(tiny["arm_small"])  # head size 64
    assert (head_size(base), head_size(arm)) == (32, 64)
    config = SimpleNamespace(
        attention_config=SimpleNamespace(backend=None),
        model_config=SimpleNamespace(hf_config=base, dtype=torch.bfloat16),
    )
    use_safe_attention_backend(config, [arm])
    assert config.attention_config.backend is AttentionBackendEnum.FLASH_ATTN
    config.model_config.dtype = torch.float32
    config.attention_config.backend = None
    with pytest.raises(ValueError, match="reward model head size 64 is larger than the base's 32"):
        use_safe_attention_backend(config, [arm])


@pytest.mark.parametrize("kwargs, match", [
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}},
     "does not support speculative decoding"),
    ({"pipeline_parallel_size": 2}, "does not support pipeline parallelism"),
])
def test_refused_engine_features(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        GuidedLLM(tiny["base"], [tiny["arm_small"]], max_model_len=256, **kwargs)


def test_gpu_check_without_a_gpu_checks_nothing_and_says_so():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA GPU on this machine: nothing checked (0 passed, 0 failed)" in done.stdout


def test_processor_module_imports_no_model_code():
    """vLLM imports the processor in its API server process (under a CUDA-hidden guard,
    vllm/utils/torch_utils.py guard_cuda_initialization): it must load no model code."""
    import subprocess
    import sys

    code = (
        "import sys, vllm.v1.sample.logits_processor, vllm.v1.worker.gpu.sample.logits_processor\n"
        "before = set(sys.modules)\n"
        "import genarm_vllm.engine.logits_processor\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = eval(done.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if not m.startswith("genarm_vllm")], loaded
    assert "genarm_vllm.engine.model" not in loaded and "genarm_vllm.engine.validation" not in loaded
