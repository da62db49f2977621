"""The batch job at scale, single process: error rows, order through a bounded reorder
buffer, the settings fingerprint, a kill -9 at a random point and the re-run."""

import json
import random
import subprocess
import sys

import pytest
from batch_rows import (
    POISON,
    build_poison_models,
    check_poisoned_output,
    good_rows,
    kill_when_lines,
    read_jsonl,
    write_jsonl,
    write_poisoned,
)
from vllm import SamplingParams

from genarm_vllm.cli import main
from genarm_vllm.jobs.batch import run_job
from genarm_vllm.jobs.fingerprint import differences, settings_path
from genarm_vllm.jobs.progress import JobProgress
from genarm_vllm.jobs.reorder import OrderedWriter

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def poison(tiny, engine, tmp_path_factory):
    """The poison models, their engine, and the all-good run of 500 rows."""
    root = tmp_path_factory.mktemp("poison")
    models = build_poison_models(tmp_path_factory, tiny)
    llm = engine("poison", base=models["base"], reward_paths=[models["arm"]])
    good = good_rows(500)
    good_out = root / "good_out.jsonl"
    summary = run_job(llm, write_jsonl(root / "good.jsonl", good), good_out, GREEDY,
                      progress=False)
    assert (summary.rows_done, summary.rows_failed) == (500, 0)
    return {"root": root, "models": models, "llm": llm, "good": good,
            "good_out": read_jsonl(good_out)}


def test_poison_rows_become_error_rows_and_the_job_goes_on(poison, tmp_path, capsys):
    # 9 poison rows of every kind among 500 good ones (1.8 %), over 2 shards.
    folder, expected = write_poisoned(tmp_path / "in", poison["good"])
    out = tmp_path / "out.jsonl"
    summary = run_job(poison["llm"], folder, out, GREEDY, progress=False)
    rows = read_jsonl(out)
    check_poisoned_output(rows, poison["good_out"], expected)
    assert (summary.rows_done, summary.rows_failed) == (500, len(POISON))
    assert summary.failures == {"bad JSON": 1, "bad row": 3, "bad guidance": 2,
                                "prompt too long": 1, "id a model cannot embed": 1,
                                "refused by the engine": 1}
    assert summary.generated_tokens == 500 * GREEDY.max_tokens
    assert f"500 rows done, {len(POISON)} failed (" in summary.line()
    assert "generated tokens/s" in summary.line()
    kept_lines = [r["input_line"] for r in rows if "input_line" in r]
    assert "not json {" in kept_lines
    # A row holding an output field name is kept as its line: nothing of it is overwritten.
    assert json.loads(next(t for t in kept_lines if "p-reserved" in t))["error"] == "mine"
    # A finished job is a no-op, and it keeps the error rows.
    assert run_job(poison["llm"], folder, out, GREEDY, progress=False).rows_written == 0
    assert read_jsonl(out) == rows

    # --on-error fail: stops at the first bad row; every row before it is written.
    failing = tmp_path / "fail.jsonl"
    (first_file, first_line) = min(expected)
    with pytest.raises(ValueError, match=rf"stopped at a bad row .*{first_file} line {first_line}: "):
        run_job(poison["llm"], folder, failing, GREEDY, on_error="fail", progress=False)
    first_bad = next(i for i, r in enumerate(rows) if "error" in r)
    assert read_jsonl(failing) == rows[:first_bad]


def test_rows_come_out_in_input_order_through_a_small_reorder_buffer(engine, tmp_path):
    llm = engine("arm_small", ["arm_small"], beta=0.5)
    # Lengths spread by EOS (temperature 1, one seed): rows finish out of input order.
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40)
    rows = good_rows(60, seed=4)
    out = tmp_path / "out.jsonl"
    summary = run_job(llm, write_jsonl(tmp_path / "in.jsonl", rows), out, params,
                      reorder_buffer=3, max_in_flight=8, progress=False)
    assert summary.peak_buffered <= 3
    # Token for token what one GuidedLLM.generate call over all rows gives.
    tokenizer = llm.get_tokenizer()
    from genarm_vllm.tokenization import prompt_ids

    want = llm.generate(
        [{"prompt_token_ids": prompt_ids(tokenizer, r.get("prompt"), r.get("messages"))}
         for r in rows], params,
        guidance=[{k: r[k] for k in ("beta", "weights") if k in r} or None for r in rows],
        use_tqdm=False)
    got = read_jsonl(out)
    assert [r["id"] for r in got] == [r["id"] for r in rows]
    assert [r["generated_token_ids"] for r in got] == [list(o.outputs[0].token_ids) for o in want]
    lengths = {len(r["generated_token_ids"]) for r in got}
    assert len(lengths) > 5  # the lengths did differ, so order had to be restored


def test_ordered_writer_holds_at_most_its_capacity(tmp_path):
    path = tmp_path / "o.jsonl"
    with OrderedWriter(path, 10, capacity=3) as writer:
        assert writer.has_room(12) and not writer.has_room(13)
        assert writer.put(12, "c\n") == 0 and writer.put(11, None) == 0
        with pytest.raises(RuntimeError, match="beyond the reorder buffer"):
            writer.put(13, "d\n")
        assert writer.put(10, "a\n") == 2  # 10, (11 has no line), 12
        assert writer.put(12, "again\n") == 0  # a position given twice is written once
        assert writer.next_index == 13 and writer.peak_pending == 3  # 10 joins 11, 12
    assert path.read_text() == "a\nc\n"


def test_the_progress_bar_ends_on_the_jobs_rates(capsys):
    # The rates are redrawn at most twice a second, so a short job used to end on stale
    # ones: "0 tok/s" from the first row, or no failure count.
    progress = JobProgress(total=3, rows_before=0)
    progress.done(tokens=40)
    progress.failed("bad JSON", "in.jsonl line 2: not valid JSON")
    progress.done(tokens=20)
    summary = progress.close()
    last_draw = capsys.readouterr().err.split("\r")[-1]
    assert "3/3" in last_draw and "1 failed" in last_draw and " 0 tok/s" not in last_draw
    assert (summary.rows_done, summary.rows_failed, summary.generated_tokens) == (2, 1, 60)
    assert "2 rows done, 1 failed (1 bad JSON); 60 tokens generated" in summary.line()


def test_changed_settings_refuse_to_append(engine, tiny, tmp_path, capsys):
    llm = engine("arm_small", ["arm_small"], beta=0.5)
    rows = good_rows(6)
    infile = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, top_k=0, top_p=1.0)
    run_job(llm, infile, out, params, progress=False)
    stored = json.loads(settings_path(out).read_text())
    assert stored["beta"] == 0.5 and stored["engine.dtype"] == "float32"
    # An interrupted run: the first 3 rows there.
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:3]))

    cli = ["generate", "--base", tiny["base"], "--reward-model", tiny["arm_small"],
           "--input", infile, "--output", out, "--max-tokens", "6", "--temperature", "0",
           "--ignore-eos", "--max-model-len", "256", "--enforce-eager", "--dtype", "float32"]
    for change, named in [(["--beta", "0.3"], "beta: 0.5 -> 0.3"),
                          (["--beta", "0.5", "--temperature", "0.7"],
                           "sampling.temperature: 0 -> 0.7"),
                          (["--beta", "0.5", "--max-tokens", "7"], "sampling.max_tokens: 6 -> 7"),
                          (["--beta", "0.5", "--dtype", "bfloat16"],
                           'engine.dtype: "float32" -> "bfloat16"'),
                          (["--beta", "0.5", "--seed", "1"], "sampling.seed: null -> 1")]:
        code = main([str(a) for a in [*cli, *change]])
        err = capsys.readouterr().err
        assert code == 2 and "refusing to append" in err and named in err, (change, err)
        assert "--overwrite" in err
    assert len(out.read_text().splitlines()) == 3  # nothing appended

    # Same settings: the CLI's fingerprint (made before any engine) equals the engine's.
    assert differences(stored, json.loads(settings_path(out).read_text())) == []
    full = tmp_path / "full.jsonl"
    run_job(llm, infile, full, params, progress=False)
    out.write_text(full.read_text())
    code = main([str(a) for a in [*cli, "--beta", "0.5"]])
    assert code == 0 and "nothing to do" in capsys.readouterr().out

    # An output without a settings file (another tool, an older version) is not appended to.
    settings_path(out).unlink()
    out.write_text(out.read_text().splitlines(keepends=True)[0])
    code = main([str(a) for a in [*cli, "--beta", "0.5"]])
    assert code == 2 and "no settings file" in capsys.readouterr().err


def test_the_cli_and_the_python_api_fingerprint_a_job_alike(tiny, monkeypatch):
    # A job begun by the CLI resumes from Python and back: both fingerprint the settings as
    # given. On a GPU (no GenARM dtype default), dtype stays "auto" in both.
    from types import SimpleNamespace

    from genarm_vllm.cli import parse_engine_flags
    from genarm_vllm.engine import defaults
    from genarm_vllm.jobs.batch import engine_settings
    from genarm_vllm.jobs.fingerprint import job_settings

    for gpu in (False, True):
        # engine.defaults holds its own name for has_gpu (imported from runtime).
        monkeypatch.setattr(defaults, "has_gpu", lambda gpu=gpu: gpu)
        cli = job_settings(tiny["base"], [tiny["arm_small"]], None, None, GREEDY,
                           parse_engine_flags(["--max-model-len", "256"]))
        llm = SimpleNamespace(base=str(tiny["base"]), reward_models=[str(tiny["arm_small"])],
                              beta=1.0, weights=[1.0], engine_kwargs={"max_model_len": 256})
        assert differences(cli, engine_settings(llm, GREEDY)) == []
        assert cli["engine.dtype"] == ("auto" if gpu else "float32")
        assert cli["engine.max_model_len"] == 256


def cli_process(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "genarm_vllm.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_kill_9_at_a_random_point_then_rerun_gives_the_uninterrupted_output(engine, tiny,
                                                                            tmp_path):
    rows = good_rows(80, seed=5)
    infile = write_jsonl(tmp_path / "in.jsonl", rows)
    # Sampled (temperature 0.9, one seed): the re-run must draw exactly the same tokens.
    params = SamplingParams(temperature=0.9, seed=7, max_tokens=24)
    reference = tmp_path / "reference.jsonl"
    run_job(engine("arm_small", ["arm_small"], beta=0.5), infile, reference, params,
            progress=False)

    out = tmp_path / "out.jsonl"
    args = ["generate", "--base", tiny["base"], "--reward-model", tiny["arm_small"],
            "--beta", "0.5", "--input", infile, "--output", out, "--temperature", "0.9",
            "--seed", "7", "--max-tokens", "24", "--max-model-len", "256", "--enforce-eager",
            "--dtype", "float32", "--max-num-seqs", "4"]  # few at once: rows trickle out
    kill_at = random.randint(1, len(rows) - 20)
    killed_with = kill_when_lines(cli_process(args), out, kill_at)
    assert killed_with < len(rows), "the kill came after the last row"
    rerun = subprocess.run([sys.executable, "-m", "genarm_vllm.cli", *map(str, args)],
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already there" in rerun.stdout
    got = read_jsonl(out)
    assert [r["id"] for r in got] == [r["id"] for r in rows]  # every row exactly once
    assert out.read_text() == reference.read_text(), f"killed at {killed_with} rows"


@pytest.mark.parametrize("n", [1, 3])
def test_every_sample_and_the_requested_logprobs_are_written(engine, tmp_path, n):
    # The job used to write outputs[0] only: n - 1 samples and every logprob were dropped.
    llm = engine("arm_small", ["arm_small"], beta=0.5)
    rows = good_rows(8, seed=6)
    params = SamplingParams(n=n, temperature=1.0, seed=11, max_tokens=5, logprobs=2)
    out = tmp_path / "out.jsonl"
    summary = run_job(llm, write_jsonl(tmp_path / "in.jsonl", rows), out, params,
                      progress=False)
    from genarm_vllm.tokenization import prompt_ids

    tokenizer = llm.get_tokenizer()
    want = llm.generate(
        [{"prompt_token_ids": prompt_ids(tokenizer, r.get("prompt"), r.get("messages"))}
         for r in rows], params,
        guidance=[{k: r[k] for k in ("beta", "weights") if k in r} or None for r in rows],
        use_tqdm=False)

    def sample(c):
        return {"generated_text": c.text, "generated_token_ids": list(c.token_ids),
                "finish_reason": c.finish_reason,
                "logprobs": [{str(t): lp.logprob for t, lp in p.items()} for p in c.logprobs]}

    expected = []
    for row, result in zip(rows, want):
        samples = [sample(c) for c in sorted(result.outputs, key=lambda c: c.index)]
        assert len(samples) == n
        expected.append({**row, **(samples[0] if n == 1 else {"samples": samples})})
    got = read_jsonl(out)
    assert got == expected
    assert all(len(p) >= 2 for r in expected for s in r.get("samples", [r])
               for p in s["logprobs"])  # the sampled token and the 2 most likely
    assert summary.generated_tokens == sum(len(c.token_ids) for o in want for c in o.outputs)
    if n > 1:  # the samples differ: each is its own draw
        assert any(len({tuple(s["generated_token_ids"]) for s in r["samples"]}) > 1
                   for r in got)
