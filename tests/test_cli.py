"""`genarm-vllm pack` / `generate` as users run them, and the batch job's resume logic."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from vllm import SamplingParams

from genarm_vllm.cli import main
from genarm_vllm.jobs.batch import run_job
from genarm_vllm.jobs.fingerprint import settings_path
from genarm_vllm.testing import build_model, build_tokenizer
from genarm_vllm.tokenization import prompt_ids

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

ROWS = [
    {"id": 1, "prompt": "the cat sat on"},
    {"id": 2, "prompt": "a dog", "beta": 0.3},
    {"id": 3, "messages": [{"role": "user", "content": "happy sun"}], "weights": [0.0]},
    {"id": 4, "prompt": "we love green trees", "beta": 2.0, "weights": [-1.0]},
    {"id": 5, "prompt": "she saw the big red car"},
]


def cli(*args, env=None, check=False):
    result = subprocess.run(
        [sys.executable, "-m", "genarm_vllm.cli", *map(str, args)],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return result


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_pack_writes_a_bundle_plain_vllm_loads(tiny, engine, tmp_path):
    bundle = tmp_path / "bundle"
    cli("pack", "--base", tiny["base"], "--reward-model", tiny["arm_small"], "--beta", "0.5",
        "--out", bundle, check=True)
    config = json.loads((bundle / "config.json").read_text())
    assert config["architectures"] == ["GenARMForCausalLM"]
    assert config["genarm_reward_models"] == [str(Path(tiny["arm_small"]).resolve())]
    assert (config["genarm_beta"], config["genarm_weights"]) == (0.5, [1.0])
    weights = bundle / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (tiny["base"] / "model.safetensors").resolve()
    # Plain vLLM, no GenARM code named: the plugin registers the architecture.
    plain = engine("bundle", plain=True, model=str(bundle))
    guided = engine("arm_small", ["arm_small"], beta=0.5)
    prompts = [r["prompt"] for r in ROWS if "prompt" in r]
    got = [list(o.outputs[0].token_ids) for o in plain.generate(prompts, GREEDY)]
    assert got == [list(o.outputs[0].token_ids) for o in guided.generate(prompts, GREEDY)]


def run_main(capsys, *args):
    """The CLI in this process (error paths: no engine, no slow interpreter start)."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_pack_refuses_bad_input(tiny, tmp_path, capsys):
    other_tok = build_tokenizer(tmp_path / "tok", corpus_seed=1)  # other ids for the same words
    other = build_model(tmp_path / "other", other_tok)
    code, err = run_main(capsys, "pack", "--base", tiny["base"], "--reward-model", other,
                         "--out", tmp_path / "b")
    assert code == 2 and "different tokenizer" in err
    code, err = run_main(capsys, "pack", "--base", tiny["base"], "--reward-model",
                         tiny["arm_small"], "--weights", "1,2", "--out", tmp_path / "b")
    assert code == 2 and "one entry per reward model" in err
    assert not (tmp_path / "b").exists()


def test_pack_again_leaves_nothing_of_the_previous_base(tiny, tmp_path, capsys):
    old_base = tmp_path / "old_base"
    shutil.copytree(tiny["base"], old_base)
    (old_base / "model-00002-of-00002.safetensors").write_bytes(b"old shard")
    out = tmp_path / "bundle"
    for base in (old_base, tiny["base"]):
        code, err = run_main(capsys, "pack", "--base", base, "--reward-model", tiny["arm_small"],
                             "--out", out)
        assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in Path(tiny["base"]).iterdir())
    assert all((out / p.name).resolve() == p.resolve()
               for p in Path(tiny["base"]).iterdir() if p.name != "config.json")


@pytest.mark.slow
def test_generate_cli_matches_python_api(tiny, engine, tmp_path):
    infile = write_jsonl(tmp_path / "in.jsonl", ROWS)
    outfile = tmp_path / "out.jsonl"
    # As a user runs it: default vLLM multiprocessing, engine flags passed through.
    result = cli("generate", "--base", tiny["base"], "--reward-model", tiny["arm_small"],
                 "--beta", "0.5", "--input", infile, "--output", outfile,
                 "--temperature", "0", "--max-tokens", "12", "--ignore-eos",
                 "--max-model-len", "256", "--enforce-eager", "--dtype", "float32",
                 env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = read_jsonl(outfile)
    assert [{k: r[k] for k in row} for r, row in zip(out, ROWS)] == ROWS
    assert all(r["finish_reason"] == "length" and len(r["generated_token_ids"]) == 12 for r in out)

    guided = engine("arm_small", ["arm_small"], beta=0.5)
    chat_ids = {"prompt_token_ids": prompt_ids(guided.get_tokenizer(), messages=ROWS[2]["messages"])}
    prompts = [r.get("prompt") or chat_ids for r in ROWS]
    guidance = [{k: r[k] for k in ("beta", "weights") if k in r} or None for r in ROWS]
    want = guided.generate(prompts, GREEDY, guidance=guidance)
    assert [r["generated_token_ids"] for r in out] == [list(o.outputs[0].token_ids) for o in want]
    assert [r["generated_text"] for r in out] == [o.outputs[0].text for o in want]

    # A finished job is a no-op that starts no engine.
    again = cli("generate", "--base", tiny["base"], "--reward-model", tiny["arm_small"],
                "--beta", "0.5", "--input", infile, "--output", outfile,
                "--temperature", "0", "--max-tokens", "12", "--ignore-eos",
                "--max-model-len", "256", "--enforce-eager", "--dtype", "float32")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert read_jsonl(outfile) == out


def test_interrupted_job_resumes_without_duplicates(tiny, engine, tmp_path):
    llm = engine("arm_small", ["arm_small"], beta=0.5)
    infile = write_jsonl(tmp_path / "in.jsonl", ROWS)
    full = tmp_path / "full.jsonl"
    assert run_job(llm, infile, full, GREEDY, progress=False).rows_done == 5
    # What an interruption leaves: 2 complete rows, a torn third one, the settings file.
    partial = tmp_path / "partial.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    partial.write_text("".join(lines[:2]) + lines[2][:25])
    shutil.copy(settings_path(full), settings_path(partial))
    summary = run_job(llm, infile, partial, GREEDY, progress=False)
    assert (summary.rows_before, summary.rows_done) == (2, 3)
    assert partial.read_text() == full.read_text()
    # Rows of another input are not taken for this one's.
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "x"}, *ROWS[1:]])
    with pytest.raises(ValueError, match="row 1 does not match the input row"):
        run_job(llm, other, partial, GREEDY, progress=False)
    # overwrite starts afresh.
    summary = run_job(llm, other, partial, GREEDY, overwrite=True, progress=False)
    assert (summary.rows_before, summary.rows_done) == (0, 5)
    assert read_jsonl(partial)[0]["prompt"] == "x"


def test_generate_cli_errors(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\nnot json\n{"prompt": "x", "beta": -1}\n')
    base_args = ["generate", "--base", tiny["base"], "--reward-model", tiny["arm_small"],
                 "--output", tmp_path / "out.jsonl"]
    # --on-error fail: every bad line listed before the engine starts (the default,
    # continue, writes them as error rows: tests/test_batch_job.py).
    code, err = run_main(capsys, *base_args, "--input", bad, "--on-error", "fail")
    assert code == 2
    for line in ("line 2: a row needs exactly one of", "line 3: not valid JSON",
                 "line 4: beta must be a finite number > 0"):
        assert line in err
    assert not (tmp_path / "out.jsonl").exists()
    good = write_jsonl(tmp_path / "good.jsonl", ROWS)
    code, err = run_main(capsys, *base_args, "--input", good, "--weights", "1,1")
    assert code == 2 and "one entry per reward model" in err
    code, err = run_main(capsys, *base_args, "--input", good, "--max-model-len", "100000")
    assert code == 2 and "exceeds reward model" in err
    with pytest.raises(SystemExit):
        main([str(a) for a in [*base_args, "--input", good, "--no-such-vllm-flag"]])
    assert "no-such-vllm-flag" in capsys.readouterr().err
    # As a user sees it: a non-zero exit and the message.
    result = cli(*base_args, "--input", bad, "--on-error", "fail")
    assert result.returncode == 2 and "line 4: beta must be" in result.stderr
    code, err = run_main(capsys, *base_args, "--input", good, "--replicas", "2")
    assert code == 2 and "--replicas: applies only with --ray; add --ray" in err


def test_chunk_size_without_ray_is_ignored_with_a_warning(tiny, engine, tmp_path, capsys):
    # Scripts of the old chunked job pass --chunk-size: it used to stop them with
    # "--chunk-size only apply with --ray".
    llm = engine("arm_small", ["arm_small"], beta=0.5)
    infile = write_jsonl(tmp_path / "in.jsonl", ROWS)
    outfile = tmp_path / "out.jsonl"
    run_job(llm, infile, outfile, GREEDY, progress=False)
    code, err = run_main(capsys, "generate", "--base", tiny["base"], "--reward-model",
                         tiny["arm_small"], "--beta", "0.5", "--input", infile, "--output",
                         outfile, "--temperature", "0", "--max-tokens", "12", "--ignore-eos",
                         "--max-model-len", "256", "--enforce-eager", "--dtype", "float32",
                         "--chunk-size", "8")
    assert code == 0, err
    assert "warning: --chunk-size ignored" in err and "applies with --ray only" in err


def test_the_cli_reads_the_input_once_before_the_first_row(tiny, engine, tmp_path, capsys,
                                                           monkeypatch):
    # It used to read it 5 times more (check, resume and count in the CLI, resume and
    # count again in run_job) before generating.
    from genarm_vllm.jobs import batch

    llm = engine("arm_small", ["arm_small"], beta=0.5)
    infile = write_jsonl(tmp_path / "in.jsonl", ROWS)
    full, outfile = tmp_path / "full.jsonl", tmp_path / "out.jsonl"
    run_job(llm, infile, full, GREEDY, progress=False)
    outfile.write_text("".join(full.read_text().splitlines(keepends=True)[:2]))
    shutil.copy(settings_path(full), settings_path(outfile))
    opened = []

    def counting_open(file, *args, **kwargs):
        if Path(file) == infile:
            opened.append(file)
        return open(file, *args, **kwargs)

    monkeypatch.setattr(batch, "open", counting_open, raising=False)
    monkeypatch.setattr("genarm_vllm.engine.llm.GuidedLLM", lambda *a, **k: llm)
    code, err = run_main(capsys, "generate", "--base", tiny["base"], "--reward-model",
                         tiny["arm_small"], "--beta", "0.5", "--input", infile, "--output",
                         outfile, "--temperature", "0", "--max-tokens", "12", "--ignore-eos",
                         "--max-model-len", "256", "--enforce-eager", "--dtype", "float32",
                         "--on-error", "fail")
    assert code == 0, err
    assert outfile.read_text() == full.read_text()
    assert len(opened) == 2  # one pass to prepare (check, resume, count), one to generate


def test_on_error_and_the_reorder_buffer_are_defined_once(tiny, tmp_path, monkeypatch):
    from genarm_vllm.cli import build_parser
    from genarm_vllm.jobs import batch, ray_job

    infile = write_jsonl(tmp_path / "in.jsonl", ROWS)
    messages = []
    for run in (lambda: run_job(None, infile, tmp_path / "o.jsonl", GREEDY, on_error="skip"),
                lambda: ray_job.run_ray_job(tiny["base"], [tiny["arm_small"]], infile,
                                            tmp_path / "o.jsonl", GREEDY, on_error="skip")):
        with pytest.raises(ValueError) as raised:
            run()
        messages.append(str(raised.value))
    assert messages[0] == messages[1] == "on_error must be one of continue, fail, got 'skip'"
    import genarm_vllm.cli as cli_module

    monkeypatch.setattr(cli_module, "REORDER_BUFFER", 7)
    monkeypatch.setattr(cli_module, "ON_ERROR", ("continue", "fail", "retry"))
    args = build_parser().parse_args(["generate", "--base", "b", "--reward-model", "r",
                                      "--input", "i", "--output", "o", "--on-error", "retry"])
    assert (args.reorder_buffer, args.on_error) == (7, "retry")
    assert batch.REORDER_BUFFER == ray_job.REORDER_BUFFER
