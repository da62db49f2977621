"""The README's main job, reduced (few prompts, few tokens), run end to end as a user runs it.

It converts the packaged SmolLM2 (once per machine, into artifacts/), rebuilds the two ARMs
from the committed adapters, runs both engine stages and checks the direction of the effect
and the report files. The full-size run and its numbers: `bash launch/quickstart.sh`.
Its scoring and report steps alone, on made-up completions, run without a model.
"""

import json
import subprocess
from pathlib import Path

import pytest

from genarm_vllm.demo import quickstart, report
from genarm_vllm.demo.scoring import vader

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


def fake_generated(out, stage, jobs, texts):
    """What the stage's sweep jobs write (jobs.sweep.run_sweep): one output per job, rows
    prompt-major; texts[setting name][prompt index]."""
    folder = out / f"{stage}.generated"
    folder.mkdir()
    for k, grid in enumerate(jobs):
        with open(folder / f"{k:03d}.jsonl", "w") as f:
            for i in range(len(next(iter(texts.values())))):
                for setting in grid:
                    text = texts[setting.name][i]
                    row = {"messages": [{"role": "user", "content": f"p{i}"}], **setting.fields(),
                           "prompt_index": i}
                    row.update({"error": "refused"} if text is None else {
                        "generated_text": text, "generated_token_ids": [1] * len(text.split()),
                        "finish_reason": "stop" if text.endswith(".") else "length"})
                    f.write(json.dumps(row) + "\n")


def test_demo_scores_and_report_on_made_up_completions(tmp_path, capsys):
    out = tmp_path
    settings = quickstart.beta_settings([0.25], control_beta=0.5)
    names = [s.name for s in settings]
    control = settings[-1]
    assert (control.beta, control.weights, control.temperature) == (None, (0.0,), pytest.approx(1 / 3))
    texts = {
        names[0]: ["I hate this awful day.", "A sad, bad form.", "We lost it", "Terrible news."],
        names[1]: ["What a wonderful, happy day!", "A great, lovely form.", "Good news!", None],
        names[2]: ["It is a day.", "A form.", "Some news.", "We are ok."],
    }
    quickstart.write_stage(out, "sweep", Path("base"), [Path("arm")], settings,
                           ["p0", "p1", "p2", "p3"], 16, control_beta=0.5)
    fake_generated(out, "sweep", [[s] for s in settings], texts)
    (out / "sweep.speed.json").write_text(json.dumps({n: 10.0 + k for k, n in enumerate(names)}))

    # Two ARMs: fewer first-person words and more positive words are both better. Front:
    # "love" (first person, most positive) and the two equal impersonal "good" settings;
    # the others are dominated.
    assert vader("I love my day.") > vader("The day is good.") > vader("The day.") > vader("The day is bad.")
    multi = quickstart.multi_settings(0.5)
    lines = ["I hate my day.", "I love my day.", "The day is good.", "The day is good.",
             "The day is bad.", "The day."]
    quickstart.write_stage(out, "multi", Path("base"), [Path("a"), Path("b")], multi, ["p0", "p1"], 16)
    fake_generated(out, "multi", [multi], {s.name: [t, t] for s, t in zip(multi, lines)})
    (out / "multi.speed.json").write_text(json.dumps({"all": 42.0}))

    quickstart.score_stage(out, "sweep")
    quickstart.score_stage(out, "multi")
    report.write_report(out)
    printed = capsys.readouterr().out

    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert rows[0]["scores"]["vader"] == vader("I hate this awful day.")
    assert sum("error" in r for r in rows) == 1 and "scores" not in rows[7]  # passed on
    table = {e["setting"]: e for e in json.loads((out / "sweep.json").read_text())["table"]}
    assert list(table) == names
    assert table[names[1]]["n"] == 3 and table[names[1]]["failed"] == 1
    assert table[names[2]]["control_beta"] == 0.5 and table[names[2]]["temperature"] == 0.3333
    assert table[names[0]]["temperature"] == 1.0 and "control_beta" not in table[names[0]]
    assert [table[n]["tokens_per_s"] for n in names] == [10.0, 11.0, 12.0]
    assert table[names[0]]["ended"] == 0.75 and table[names[0]]["mean_tokens"] == 3.5
    assert "beta=0.25 vs unguided: VADER +" in printed and "(intervals apart)" in printed
    md = (out / "sweep.md").read_text()
    assert "| control: sharpened base (no ARM), matches beta=0.5 | 2 |" in md  # 1/beta matched
    examples = (out / "examples.md").read_text()
    assert "**p0**" in examples and "**p2**" in examples and "wonderful, happy day" in examples

    multi_table = json.loads((out / "multi.json").read_text())["table"]
    assert [e["pareto"] for e in multi_table] == [False, True, True, True, False, False]
    assert [e["weights"] for e in multi_table][:2] == [[0.0, 0.0], [1.0, 0.0]]
    assert "42 tokens/s overall" in (out / "multi.md").read_text()
    for name in ("sweep.png", "pareto.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "written to" in printed and "multi.json" in printed
