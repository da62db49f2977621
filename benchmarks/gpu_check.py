"""GPU check: the GenARM engine against the reference decoder on the GPU path users take.

    python benchmarks/gpu_check.py [--keep WORK_DIR]

On a machine with an NVIDIA GPU and vLLM 0.33 (installed by `bash launch/setup.sh`), each
case builds the tiny test models (genarm_vllm.testing: a Llama base of head size 32, a
one-layer ARM of head size 64, a Qwen2 ARM) and compares greedy output of GuidedLLM with
`ReferenceDecoder` token for token, in bfloat16, with CUDA graphs (no enforce_eager),
chunked prefill and vLLM's default model runner (Model Runner V2 on 0.33):

    default backend      vLLM's attention backend choice (GenARM picks FLASH_ATTN: the ARM's
                         head size is larger than the base's)
    flash-attn           attention_backend=FLASH_ATTN given by the user
    per-request          a different beta / weights per prompt in one batch
    repetition-penalty   repetition_penalty=1.3 with per-request guidance (V1 runner); under
                         Model Runner V2 that combination must be refused (V2 penalizes
                         before logits processors), and the penalty with the engine's
                         default guidance must be exact
    tensor-parallel-2    tensor_parallel_size=2 (only with two GPUs or more)

Each case runs in its own process (an engine cannot be torn down safely in-process) and must
finish within the time budget; the script prints a pass/fail table and exits 1 on any
failure. Without a GPU it says so and exits 0, counting nothing as passed.
The tiny models' large initializer range keeps their next-token distributions peaked, so
bfloat16 rounding rarely decides a greedy choice; a FAIL names the first differing sequence.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "default backend": {},
    "flash-attn": {"attention_backend": "FLASH_ATTN"},
    "per-request": {"per_request": True},
    "repetition-penalty": {"per_request": True, "repetition_penalty": 1.3},
    # The one-head ARM cannot be sharded over 2 GPUs: the Qwen2 ARM (2 heads, 1 KV head) can.
    "tensor-parallel-2": {"tensor_parallel_size": 2, "arms": ["arm_qwen2"], "weights": [1.0]},
}
PROMPTS = ["the cat sat on", "a dog", "happy sun is very warm and bright", "we love green trees"]
GUIDANCE = [None, {"beta": 0.3}, {"weights": [0.0, 1.0]}, {"beta": 2.0, "weights": [1.0, -0.5]}]
MAX_TOKENS = 24


def run_case(work: Path, case: dict) -> dict:
    """One case, in this process: engine vs reference. Returns the case's row of the table."""
    import torch
    from vllm import SamplingParams

    from genarm_vllm import GuidedLLM, ReferenceDecoder
    from genarm_vllm.testing import build_tiny_family

    tiny = build_tiny_family(work / "tiny")
    case = dict(case)
    arms = [tiny[name] for name in case.pop("arms", ["arm_small", "arm_qwen2"])]
    weights = case.pop("weights", [1.0, -0.5])
    per_request, penalty = case.pop("per_request", False), case.pop("repetition_penalty", 1.0)
    guidance = GUIDANCE if per_request else None
    llm = GuidedLLM(tiny["base"], arms, beta=0.7, weights=weights, dtype="bfloat16",
                    max_model_len=256, enable_chunked_prefill=True, **case)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            repetition_penalty=penalty)
    refused = ""
    if penalty != 1.0 and per_request and llm.llm.llm_engine.vllm_config.use_v2_model_runner:
        try:
            llm.generate(PROMPTS, params, guidance=guidance, use_tqdm=False)
            return {"status": "FAIL", "detail": "V2: own guidance + repetition penalty not refused"}
        except ValueError as e:
            if "refused under" not in str(e):
                raise
        refused, guidance = "V2 refused own guidance + penalty; ", None
    got = [list(o.outputs[0].token_ids)
           for o in llm.generate(PROMPTS, params, guidance=guidance, use_tqdm=False)]
    reference = ReferenceDecoder(tiny["base"], arms, beta=0.7, weights=weights,
                                 dtype=torch.bfloat16, device="cuda")
    # The penalty on the request's own mix (what vLLM's V1 runner computes).
    want = reference.generate(PROMPTS, MAX_TOKENS, guidance=guidance, ignore_eos=True,
                              repetition_penalty=penalty)
    mismatches = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    if not mismatches:
        return {"status": "PASS", "detail": f"{refused}{len(PROMPTS)} sequences equal"}
    return {"status": "FAIL", "detail": f"sequences {mismatches} differ from the reference "
            f"(first: {got[mismatches[0]][:8]} vs {want[mismatches[0]][:8]})"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", default=None, help="work folder to keep (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per case (240)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, internal
    args = parser.parse_args()

    import torch

    if args.case is not None:
        work = Path(args.keep)
        print(json.dumps(run_case(work, CASES[args.case])))
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine: nothing checked (0 passed, 0 failed)")
        return 0
    work = Path(args.keep or tempfile.mkdtemp(prefix="genarm-gpu-check-"))
    rows = []
    for name in CASES:
        if name == "tensor-parallel-2" and torch.cuda.device_count() < 2:
            rows.append((name, "SKIP", "one GPU: tensor parallel 2 needs two"))
            continue
        started = time.time()
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--case", name, "--keep", str(work / name.replace(" ", "_"))],
                capture_output=True, text=True, timeout=args.timeout,
            )
            result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {
                "status": "FAIL", "detail": done.stderr.strip().splitlines()[-1:]}
        except subprocess.TimeoutExpired:
            result = {"status": "FAIL", "detail": f"timed out after {args.timeout:g} s"}
        rows.append((name, result["status"], f"{result['detail']} ({time.time() - started:.0f} s)"))
    width = max(len(name) for name, _, _ in rows)
    for name, status, detail in rows:
        print(f"{name:<{width}}  {status:<9}  {detail}")
    failed = [name for name, status, _ in rows if status == "FAIL"]
    print(f"gpu_check: {sum(s == 'PASS' for _, s, _ in rows)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
