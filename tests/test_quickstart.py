"""The README's main job, reduced (few prompts, few tokens), run end to end as a user runs it.

It converts the packaged SmolLM2 (once per machine, into artifacts/), rebuilds the two ARMs
from the committed adapters, runs both engine stages and checks the direction of the effect
and the report files. The full-size run and its numbers: `bash launch/quickstart.sh`.
"""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_guidance_raises_sentiment_on_both_scorers(tmp_path):
    out = tmp_path / "quickstart"
    result = subprocess.run(
        ["bash", str(ROOT / "launch" / "quickstart.sh"), "--prompts", "24", "--max-tokens", "16",
         "--betas", "0.25", "--control-beta", "0", "--multi-prompts", "4",
         "--multi-max-tokens", "16", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    sweep = json.loads((out / "sweep.json").read_text())
    rows = {row["setting"]: row for row in sweep["table"]}
    assert set(rows) == {"unguided", "beta=0.25"}
    for scorer in ("vader", "afinn"):
        assert rows["beta=0.25"][scorer]["mean"] > rows["unguided"][scorer]["mean"], (scorer, rows)
    assert all(row["n"] == 24 and row["tokens_per_s"] > 0 for row in rows.values())

    multi = json.loads((out / "multi.json").read_text())
    assert [row["weights"] for row in multi["table"]] == [
        [0.0, 0.0], [1.0, 0.0], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.0, 1.0]]
    for name in ("sweep.md", "sweep.png", "examples.md", "multi.md", "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    assert "beta=0.25 vs unguided" in result.stdout
