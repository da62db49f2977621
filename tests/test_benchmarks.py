"""benchmarks/throughput.py end to end on the tiny models (its figures, not its speed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_throughput_sweep_writes_every_figure(tiny, tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--base", str(tiny["base"]),
         "--batch-sizes", "1,3", "--output-len", "4", "--prompt-len", "6", "--small-layers", "1",
         "--batch1-prompts", "1", "--min-seconds", "0", "--work", str(tmp_path),
         "--json", str(out)],
        check=True, timeout=900, cwd=tmp_path,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    report = json.loads(out.read_text())
    assert report["settings"]["engine"]["enable_prefix_caching"] is False
    rows = report["results"]
    # One row per (ARM size, batch size), each with every system and ratio.
    assert [(r["arm"], r["batch"]) for r in rows] == [
        ("same", 1), ("same", 3), ("small", 1), ("small", 3)
    ]
    for row in rows:
        rates = [row[k] for k in ("a_base_vllm", "b_arm_vllm", "c_genarm", "c_genarm_heterogeneous",
                                  "d_reference_batched", "e_reference_batch1")]
        assert all(rate > 0 for rate in rates)
        bound = 1 / (1 / row["a_base_vllm"] + 1 / row["b_arm_vllm"])
        assert abs(row["c_over_bound"] - row["c_genarm"] / bound) < 1e-9
    # The profile at the largest batch times each sub-model and the re-mix, which only
    # per-request guidance runs.
    uniform, heterogeneous = rows[1]["profile_uniform"], rows[1]["profile_heterogeneous"]
    for part in ("base_forward", "arm_a_forward", "compute_logits_and_mix"):
        assert uniform[part]["s"] > 0 and heterogeneous[part]["s"] > 0
    remix = uniform["per_request_remix"]["s"], heterogeneous["per_request_remix"]["s"]
    assert remix[0] < remix[1]  # uniform requests only pass through the processor
    assert (tmp_path / "throughput.md").read_text().count("\n") == 2 + len(rows)
    assert (tmp_path / "throughput.png").stat().st_size > 0
