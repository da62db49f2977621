"""Start-up cost of a short job: the README's five-row example, start to first row and to end.

Runs `genarm-vllm generate` on the tiny models (two bad rows among five, as the README's
example) as a user would, in a fresh process with the user's environment (no test
settings), and times from the command's start to the first output row on disk and to its
exit. Two ways, alternating over rounds so machine noise hits both alike:
  (now)      the defaults: a one-worker engine in the command's own process and a KV cache
             no larger than the engine can use (genarm_vllm/engine/defaults.py);
  (before)   vLLM's engine-core process and its spawned worker process
             (VLLM_ENABLE_V1_MULTIPROCESSING=1) and a KV cache of a quarter of the
             available memory, as the command ran before.
Records the CPU's vector extensions with the figures.

    python benchmarks/startup.py --rounds 3 --json artifacts/bench_startup/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from genarm_vllm import runtime

ROWS = [
    '{"id": 1, "prompt": "the cat sat on"}',
    '{"id": 2, "prompt": "a dog", "beta": 0.3}',
    '{"id": 3, "prompt": "a dog", "beta": -1}',
    '{"id": 4, "prompt": "happy sun',
    '{"id": 5, "messages": [{"role": "user", "content": "we love green trees"}]}',
]




def run_once(models: Path, work: Path, before: bool) -> dict:
    """One `genarm-vllm generate` of the README example: seconds to first row and to exit."""
    inp, out = work / "in.jsonl", work / "out.jsonl"
    inp.write_text("\n".join(ROWS) + "\n")
    for stale in work.glob("out.jsonl*"):
        stale.unlink()
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    extra = []
    if before:
        import psutil

        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        extra = ["--kv-cache-memory-bytes", str(int(psutil.virtual_memory().available * 0.25))]
    command = [sys.executable, "-m", "genarm_vllm.cli", "generate", "--base", str(models / "base"),
               "--reward-model", str(models / "arm_small"), "--input", str(inp), "--output", str(out),
               "--temperature", "0", "--max-tokens", "8", "--max-model-len", "256",
               "--enforce-eager", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    first_row = None
    while proc.poll() is None:
        if first_row is None and out.exists() and out.stat().st_size > 0:
            first_row = time.perf_counter() - start
        time.sleep(0.05)
    end = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"generate failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5, rows
    return {"first_row_s": round(first_row if first_row is not None else end, 2),
            "end_s": round(end, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from genarm_vllm.testing import build_tiny_family

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_tiny_family(tmp / "models")
        runs = {"now": [], "before": []}
        for i in range(args.rounds):
            order = ["now", "before"] if i % 2 == 0 else ["before", "now"]
            for system in order:
                result = run_once(tmp / "models", tmp, before=system == "before")
                runs[system].append(result)
                print(f"round {i + 1} {system:>6}: first row {result['first_row_s']:6.2f} s, "
                      f"end {result['end_s']:6.2f} s", flush=True)
    summary = {system: {key: statistics.median(r[key] for r in rs) for key in ("first_row_s", "end_s")}
               for system, rs in runs.items()}
    report = {"cpu": platform.processor() or platform.machine(), "cpu_flags": runtime.cpu_flags(),
              "cores": os.cpu_count(), "rounds": runs, "median": summary}
    print(json.dumps(report["median"], indent=1), "CPU flags:", " ".join(report["cpu_flags"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
