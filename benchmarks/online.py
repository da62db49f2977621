"""Online benchmark: vLLM's own benchmark client against `genarm-vllm serve`.

Starts the server (base + ARM), waits for /health, then runs `vllm.benchmarks.serve`
(random prompts, fixed output lengths) at each client concurrency, with the request
carrying its own guidance in `vllm_xargs`. Reports request throughput, output tokens/s
and TTFT / TPOT / ITL / end-to-end latency percentiles.

    python benchmarks/online.py --concurrency 1,8,32 --num-prompts 64 --json artifacts/bench/online.json
    python benchmarks/online.py --concurrency 8,32 --dtype bfloat16   # other flags go to the server
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import requests

from genarm_vllm import runtime

# The server runs its engine in its own process (vLLM's normal mode); 2 GiB of KV cache.
runtime.use_local_env(VLLM_CPU_KVCACHE_SPACE="2", VLLM_ENABLE_V1_MULTIPROCESSING="1")

KEYS = ["request_throughput", "output_throughput", "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms",
        "mean_tpot_ms", "p50_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p50_itl_ms", "p99_itl_ms",
        "mean_e2el_ms", "p99_e2el_ms", "completed"]


def start_server(base: str, arm: str, port: int, log_path: Path,
                 server_args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "genarm_vllm.cli", "serve", "--base", base,
           "--reward-model", arm, "--port", str(port), "--host", "127.0.0.1",
           "--served-model-name", "genarm", "--max-model-len", "512", "--enforce-eager",
           *server_args]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log_path}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(2)
    proc.terminate()
    raise RuntimeError(f"server did not start in time; see {log_path}")


def run_client(base: str, port: int, concurrency: int, args) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    client_args = parser.parse_args([
        "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
        "--model", "genarm", "--tokenizer", base,
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--ignore-eos",
        "--num-prompts", str(args.num_prompts), "--max-concurrency", str(concurrency),
        "--request-rate", args.request_rate, "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--extra-body", json.dumps({"vllm_xargs": {"genarm_beta": 0.5, "genarm_weights": [1.0]}}),
        "--disable-tqdm",
    ])
    result = main(client_args)
    return {"concurrency": concurrency, "request_rate": args.request_rate,
            **{k: result.get(k) for k in KEYS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="base model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--arm", help="ARM folder (default: the base itself, same cost as a same-size ARM)")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--request-rate", default="inf", help="requests/s (inf: all at once)")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--work", default="artifacts/bench")
    parser.add_argument("--json", help="write results as JSON here")
    args, server_args = parser.parse_known_args()  # the rest: vLLM server flags
    if args.base is None:
        from genarm_vllm.demo.smollm2 import DEFAULT_DEST, prepare_smollm2

        args.base = str(prepare_smollm2(DEFAULT_DEST))
    arm = args.arm or args.base
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    server = start_server(args.base, arm, args.port, work / "online_server.log", server_args)
    try:
        results = [run_client(args.base, args.port, int(c), args) for c in args.concurrency.split(",")]
    finally:
        server.terminate()
        server.wait(timeout=60)
    header = ["concurrency", "request_throughput", "output_throughput", "p50_ttft_ms", "p99_ttft_ms",
              "p50_itl_ms", "p99_itl_ms", "p99_e2el_ms", "completed"]
    table = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    for r in results:
        table += "| " + " | ".join(f"{r[h]:.1f}" if isinstance(r[h], float) else str(r[h])
                                   for h in header) + " |\n"
    print(table)
    out = Path(args.json) if args.json else work / "online.json"
    out.write_text(json.dumps({"base": args.base, "arm": arm, "server_args": server_args,
                               "results": results}, indent=2) + "\n")
    (work / "online.md").write_text(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
