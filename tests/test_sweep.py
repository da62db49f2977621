"""Multi-objective research in one command: `sweep` (a grid of guidance settings as one
batch job), `score` (reward models on vLLM's pooling runner, the ARM as a scorer) and
`report` (bootstrap means, Pareto front, win rates)."""

import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from batch_rows import kill_when_lines, read_jsonl, write_jsonl
from vllm import SamplingParams

from genarm_vllm.cli import main
from genarm_vllm.jobs import report, score, sweep
from genarm_vllm.jobs.batch import InputLine, run_job
from genarm_vllm.jobs.fingerprint import check_or_store, settings_path
from genarm_vllm.testing import BASE_SHAPE, WORDS

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
ARMS = ["arm_small", "arm_qwen2"]
SETTINGS = sweep.grid([1.0, 0.5], [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])


def prompts(n, seed=0, words=(2, 8)):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = " ".join(rng.choices(WORDS, k=rng.randint(*words)))
        rows.append({"id": i, "prompt": text} if i % 4 else
                    {"id": i, "messages": [{"role": "user", "content": text}]})
    return rows


def lines(*texts):
    return iter(InputLine(i, "in.jsonl", i + 1, t) for i, t in enumerate(texts))


# ----------------------------------------------------------------------------- sweep, no engine


def test_rows_expand_prompt_major_and_non_rows_pass_once():
    settings = [sweep.Setting("a", 1.0, (1.0, 0.0)), sweep.Setting("b", None, (0.0, 1.0)),
                sweep.Setting("c", 0.5, None)]
    out = list(sweep.expand_lines(lines(
        '{"id": 1, "prompt": "x"}', "", "not json", '{"id": 2, "prompt": "y"}',
        '{"prompt": "z", "generated_text": "old"}'), settings))
    rows = [json.loads(t) if t.startswith("{") else t for t in out]
    assert rows[:3] == [
        {"id": 1, "prompt": "x", "setting": "a", "beta": 1.0, "weights": [1.0, 0.0], "prompt_index": 0},
        {"id": 1, "prompt": "x", "setting": "b", "weights": [0.0, 1.0], "prompt_index": 0},
        {"id": 1, "prompt": "x", "setting": "c", "beta": 0.5, "prompt_index": 0},
    ]
    assert rows[3] == "not json"  # once, as it is: the batch job makes it an error row
    assert [(r["id"], r["setting"], r["prompt_index"]) for r in rows[4:7]] == [
        (2, "a", 2), (2, "b", 2), (2, "c", 2)]
    assert rows[7] == {"prompt": "z", "generated_text": "old"}  # once, unchanged
    with pytest.raises(ValueError, match=r"in.jsonl line 1: the row holds 'beta'"):
        list(sweep.expand_lines(lines('{"prompt": "x", "beta": 2}'), settings))


def test_grids_and_settings_files(tmp_path):
    assert [s.name for s in SETTINGS] == [
        "beta=1 w=1,0", "beta=1 w=0.5,0.5", "beta=1 w=0,1",
        "beta=0.5 w=1,0", "beta=0.5 w=0.5,0.5", "beta=0.5 w=0,1"]
    assert sweep.parse_weight_grid("1,0;0.5,0.5") == [[1, 0], [0.5, 0.5]]
    assert [s.fields() for s in sweep.grid([2.0])] == [{"setting": "beta=2", "beta": 2.0}]
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"name": "helpful", "beta": 1, "weights": [1, 0]},
                                {"name": "unguided", "weights": [0, 0]}]))
    assert sweep.read_settings_file(path) == [sweep.Setting("helpful", 1.0, (1.0, 0.0)),
                                              sweep.Setting("unguided", None, (0.0, 0.0))]
    with pytest.raises(ValueError, match="one entry per reward model"):
        sweep.check_settings(sweep.grid(None, [[1, 0, 1]]), 2)
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        sweep.check_settings(sweep.grid([-1.0]), 2)
    with pytest.raises(ValueError, match="two settings are named"):
        sweep.check_settings([sweep.Setting("a", 1.0), sweep.Setting("a", 2.0)], 1)


def test_a_setting_may_sample_at_its_own_temperature(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"weights": [0], "temperature": 0.5}, {"name": "t", "temperature": 0}]))
    settings = sweep.read_settings_file(path)
    assert settings == [sweep.Setting("w=0 T=0.5", None, (0.0,), 0.5), sweep.Setting("t", None, None, 0.0)]
    assert settings[0].fields() == {"setting": "w=0 T=0.5", "weights": [0.0], "temperature": 0.5}
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        sweep.check_settings([sweep.Setting("hot", temperature=-1.0)], 1)
    # The expanded rows carry it; the batch job checks a row's own temperature.
    with pytest.raises(ValueError, match="the row holds 'temperature'"):
        list(sweep.expand_lines(lines('{"prompt": "x", "temperature": 2}'), settings))
    from genarm_vllm.jobs.batch import parse_line

    for bad in ("-0.5", '"hot"', "true", "NaN"):
        parsed = parse_line(InputLine(0, "in.jsonl", 1, f'{{"prompt": "x", "temperature": {bad}}}'), 1)
        assert "temperature must be a finite number >= 0" in str(parsed.error), bad


# ----------------------------------------------------------------------------- sweep on the engine


def per_setting_reference(llm, rows, settings, root, params=GREEDY):
    """The official way: one `generate` job (batch.run_job) per setting; rows prompt-major."""
    outputs = []
    for k, setting in enumerate(settings):
        rows_k = [{**r, **setting.fields(), "prompt_index": i} for i, r in enumerate(rows)]
        out = root / f"ref-{k}.jsonl"
        run_job(llm, write_jsonl(root / f"ref-in-{k}.jsonl", rows_k), out, params,
                progress=False, overwrite=True)
        outputs.append(read_jsonl(out))
    return [outputs[k][i] for i in range(len(rows)) for k in range(len(settings))]


@pytest.fixture(scope="module")
def two_arms(engine):
    return engine("sweep-two-arms", ARMS)


def test_a_sweep_equals_one_generate_job_per_setting(two_arms, tmp_path):
    rows = prompts(12)
    infile = write_jsonl(tmp_path / "in.jsonl", rows)
    with open(infile, "a") as f:
        f.write("not json {\n")
        f.write(json.dumps({"id": "bad", "text": "no prompt"}) + "\n")
    out = tmp_path / "out.jsonl"
    result = sweep.run_sweep(two_arms, infile, out, GREEDY, SETTINGS, progress=False)
    got = read_jsonl(out)
    want = per_setting_reference(two_arms, rows, SETTINGS, tmp_path)
    good = [r for r in got if "error" not in r]
    assert good == want  # every field, token for token, prompt-major
    errors = [r for r in got if "error" in r]
    assert len(errors) == 1 + len(SETTINGS)  # bad JSON once; a prompt-less row per setting
    assert errors[0]["input_line"] == "not json {"
    assert all("exactly one of" in e["error"] for e in errors[1:])
    assert [e["setting"] for e in errors[1:]] == [s.name for s in SETTINGS]
    assert result.job.rows_done == len(rows) * len(SETTINGS)
    assert not sweep.expanded_path_for(out).exists()  # removed once the job completed
    stored = json.loads(settings_path(out).read_text())
    assert stored["sweep.settings"] == [s.fields() for s in SETTINGS]

    # The grid is in the fingerprint: another grid refuses to append to a part-done output.
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:5]))
    with pytest.raises(ValueError, match=r"sweep.settings: .* -> "):
        sweep.run_sweep(two_arms, infile, out, GREEDY, SETTINGS[:3], progress=False)
    # The same grid resumes and completes it.
    again = sweep.run_sweep(two_arms, infile, out, GREEDY, SETTINGS, progress=False)
    assert again.job.rows_before == 5 and read_jsonl(out) == got


def test_setting_temperatures_equal_jobs_run_at_those_temperatures(two_arms, tmp_path):
    # The job samples at T=1 (seeded); one setting is greedy, one samples at T=0.5: each
    # must give what a `generate` job at that temperature gives its rows.
    rows = prompts(6, seed=5)
    job = SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    settings = [sweep.Setting("greedy", 1.0, (1.0, 0.0), temperature=0.0),
                sweep.Setting("cool", 0.5, (0.5, 0.5), temperature=0.5)]
    out = tmp_path / "out.jsonl"
    sweep.run_sweep(two_arms, write_jsonl(tmp_path / "in.jsonl", rows), out, job, settings,
                    progress=False)
    got = read_jsonl(out)
    want = {}
    for k, (setting, temperature) in enumerate([(settings[0], 0.0), (settings[1], 0.5), (settings[1], 1.0)]):
        # The reference rows hold no "temperature": the job's SamplingParams decide it.
        fields = {n: v for n, v in setting.fields().items() if n != "temperature"}
        ref = tmp_path / f"ref-{k}.jsonl"
        run_job(two_arms, write_jsonl(tmp_path / f"ref-in-{k}.jsonl",
                                      [{**r, **fields, "prompt_index": i} for i, r in enumerate(rows)]),
                ref, SamplingParams(temperature=temperature, seed=7, max_tokens=6, ignore_eos=True),
                progress=False)
        want[temperature] = [{**r, "temperature": setting.temperature} for r in read_jsonl(ref)]
    assert got[0::2] == want[0.0] and got[1::2] == want[0.5]
    texts = [r["generated_token_ids"] for r in want[1.0]]
    assert texts != [r["generated_token_ids"] for r in want[0.5]]  # the temperature mattered


def test_settings_of_one_prompt_share_its_prefill_through_the_prefix_cache(two_arms, tmp_path):
    # Only full KV blocks are cached (128 tokens on CPU): prompts of 150-200 tokens.
    rows = prompts(4, seed=3, words=(150, 200))
    infile = write_jsonl(tmp_path / "in.jsonl", rows)
    settings = SETTINGS[:3]
    result = sweep.run_sweep(two_arms, infile, tmp_path / "out.jsonl", GREEDY, settings,
                             progress=False)
    cache = result.prefix_cache
    assert cache.requests == len(rows) * len(settings)
    # Every setting after a prompt's first finds the prompt's full blocks in the cache.
    assert cache.cached_tokens >= len(rows) * (len(settings) - 1) * 128, cache.line()
    assert "prefix cache:" in result.report()


@pytest.mark.slow
def test_sweep_cli_killed_then_rerun_equals_one_job_per_setting(two_arms, tiny, tmp_path):
    rows = prompts(30, seed=9)
    infile = write_jsonl(tmp_path / "in.jsonl", rows)
    want = per_setting_reference(two_arms, rows, SETTINGS, tmp_path)
    out = tmp_path / "out.jsonl"
    args = ["sweep", "--base", tiny["base"], "--reward-model", tiny[ARMS[0]],
            "--reward-model", tiny[ARMS[1]], "--betas", "1,0.5",
            "--weights", "1,0;0.5,0.5;0,1", "--input", infile, "--output", out,
            "--temperature", "0", "--max-tokens", "6", "--ignore-eos", "--max-model-len", "256",
            "--enforce-eager", "--dtype", "float32", "--max-num-seqs", "4"]
    process = subprocess.Popen([sys.executable, "-m", "genarm_vllm.cli", *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_with = kill_when_lines(process, out, random.randint(5, 100))
    assert killed_with < len(want)
    rerun = subprocess.run([sys.executable, "-m", "genarm_vllm.cli", *map(str, args)],
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already there" in rerun.stdout and "prefix cache:" in rerun.stdout
    assert read_jsonl(out) == want, f"killed at {killed_with} rows"


# ----------------------------------------------------------------------------- score


@pytest.fixture(scope="module")
def reward_models(tiny, tmp_path_factory):
    """Two tiny LlamaForSequenceClassification reward models (one label): one whose
    tokenizer has the tiny chat template, one without a chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("rm")
    paths = {}
    for name, seed, chat in [("rm_chat", 11, True), ("rm_plain", 12, False)]:
        tok = AutoTokenizer.from_pretrained(str(tiny["base"]))
        if not chat:
            tok.chat_template = None
        config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=512,
                             initializer_range=0.3, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             num_labels=1, tie_word_embeddings=False, **BASE_SHAPE)
        torch.manual_seed(seed)
        LlamaForSequenceClassification(config).eval().save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def hf_reward(path, texts_or_ids):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    out = []
    with torch.no_grad():
        for item in texts_or_ids:
            ids = tok(item).input_ids if isinstance(item, str) else item
            out.append(model(torch.tensor([ids])).logits[0, 0].item())
    return out


def hf_arm_reward(path, prompt_ids, response_ids, beta_r):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    start = len(prompt_ids)
    return beta_r * sum(logprobs[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))


SCORED_ROWS = [
    {"id": 0, "prompt": "the cat sat on", "generated_text": " the mat and"},
    {"id": 1, "prompt": "a dog", "generated_text": " ran fast", "generated_token_ids": [30, 31]},
    {"id": 2, "messages": [{"role": "user", "content": "happy sun"}], "generated_text": "is warm"},
    {"id": 3, "prompt": "we", "generated_text": "", "scores": {"old": 1.5}},
    {"id": 4, "prompt": "no answer"},                                 # no generated_text
    {"id": 5, "generated_text": "no prompt"},                        # no prompt
    {"id": 6, "prompt": "x", "error": "an earlier failure"},          # passed on as it is
    {"id": 7, "prompt": " ".join(["cat"] * 300), "generated_text": "too long"},
]


@pytest.fixture(scope="module")
def scorer_engines(engine, reward_models, tiny):
    return {
        "rm_chat": engine("score-rm-chat", plain=True, model=str(reward_models["rm_chat"]),
                          runner="pooling"),
        "rm_plain": engine("score-rm-plain", plain=True, model=str(reward_models["rm_plain"]),
                           runner="pooling"),
        "arm": engine("score-arm", plain=True, model=str(tiny["arm_small"])),
    }


def test_scores_equal_transformers_and_bad_rows_become_error_rows(
        scorer_engines, reward_models, tiny, tmp_path):
    from transformers import AutoTokenizer

    infile = tmp_path / "in.jsonl"
    with open(infile, "w") as f:
        for row in SCORED_ROWS:
            f.write(json.dumps(row) + "\n")
        f.write("\nnot json\n")
    scorers = [score.Scorer("rm_chat", str(reward_models["rm_chat"])),
               score.Scorer("rm_plain", str(reward_models["rm_plain"]), sign=-1.0),
               score.Scorer("arm", str(tiny["arm_small"]), kind="arm", beta_r=0.05)]
    out = tmp_path / "scored.jsonl"
    summary = score.score_job(infile, out, scorers, engines=scorer_engines, progress=False,
                              chunk_rows=3)
    got = read_jsonl(out)
    assert [r.get("id") for r in got] == [r["id"] for r in SCORED_ROWS] + [None]
    good = got[:4]

    # The reward model with a chat template reads the chat; the other prompt + response.
    tok = AutoTokenizer.from_pretrained(str(tiny["base"]))
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": a}]
             for p, a in [("the cat sat on", " the mat and"), ("a dog", " ran fast"),
                          ("happy sun", "is warm"), ("we", "")]]
    chat_ids = [tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False).input_ids
                for c in chats]
    want_chat = hf_reward(reward_models["rm_chat"], chat_ids)
    want_plain = hf_reward(reward_models["rm_plain"],
                           ["the cat sat on the mat and", "a dog ran fast", "we"])
    arm_tok = AutoTokenizer.from_pretrained(str(tiny["arm_small"]))
    from genarm_vllm.tokenization import prompt_ids, response_ids

    want_arm = [
        hf_arm_reward(tiny["arm_small"], prompt_ids(arm_tok, "the cat sat on"),
                      response_ids(arm_tok, " the mat and"), 0.05),
        hf_arm_reward(tiny["arm_small"], prompt_ids(arm_tok, "a dog"), [30, 31], 0.05),  # its tokens
        hf_arm_reward(tiny["arm_small"],
                      prompt_ids(arm_tok, messages=[{"role": "user", "content": "happy sun"}]),
                      response_ids(arm_tok, "is warm"), 0.05),
        hf_arm_reward(tiny["arm_small"], prompt_ids(arm_tok, "we"), response_ids(arm_tok, ""), 0.05),
    ]
    for i, row in enumerate(good):
        assert row["scores"]["rm_chat"] == pytest.approx(want_chat[i], rel=1e-4, abs=1e-4)
        assert row["scores"]["arm"] == pytest.approx(want_arm[i], rel=1e-4, abs=1e-4)
    # No chat template: the chat row is an error row of that scorer alone, its other scores kept.
    assert [good[i]["scores"]["rm_plain"] for i in (0, 1, 3)] == pytest.approx(
        [want_plain[0], want_plain[1], want_plain[2]], rel=1e-4, abs=1e-4)
    assert "rm_plain" not in good[2]["scores"]
    assert "'rm_plain': the row holds chat messages" in good[2]["error"]
    assert good[3]["scores"]["old"] == 1.5  # earlier scores kept

    assert "no \"generated_text\"" in got[4]["error"] and "in.jsonl line 5" in got[4]["error"]
    assert "exactly one of" in got[5]["error"]
    assert got[6] == SCORED_ROWS[6]  # an error row already: passed on unchanged
    assert "too long" in got[7]["error"] or "tokens, more than" in got[7]["error"]
    assert got[8]["input_line"] == "not json" and "not valid JSON" in got[8]["error"]
    assert (summary.rows_scored, summary.rows_passed_on) == (3, 1)
    assert summary.rows_failed == 5
    assert score.read_signs(out) == {"rm_chat": 1.0, "rm_plain": -1.0, "arm": 1.0}
    assert not out.with_name(out.name + ".parts").exists()

    # Resume: a part cut short (a kill) is completed; the merged output is the same.
    again = tmp_path / "again.jsonl"
    parts = again.with_name(again.name + ".parts")
    parts.mkdir()
    check_or_store(again, score.score_settings(scorers, None), has_rows=False)  # as score_job
    first = score.score_part(scorer_engines["arm"], scorers[2], infile, again, progress=False)
    text = (parts / "arm.jsonl").read_text()
    (parts / "arm.jsonl").write_text(text[: len(text) // 2])  # torn in the middle of a line
    assert first["scored"] == 4
    with pytest.raises(ValueError, match="refusing to append"):  # another beta_r
        score.score_job(infile, again, [*scorers[:2], score.Scorer(
            "arm", str(tiny["arm_small"]), kind="arm", beta_r=0.1)], engines=scorer_engines,
            progress=False)
    score.score_job(infile, again, scorers, engines=scorer_engines, progress=False)
    assert read_jsonl(again) == got

    # A part scored from another input is never merged into this one.
    third = tmp_path / "third.jsonl"
    check_or_store(third, score.score_settings(scorers, None), has_rows=False)
    score.score_part(scorer_engines["arm"], scorers[2], infile, third, progress=False)
    other = write_jsonl(tmp_path / "other.jsonl", SCORED_ROWS[::-1])
    with pytest.raises(ValueError, match="scored from another input"):
        score.score_job(other, third, scorers, engines=scorer_engines, progress=False)


def test_scorer_specs():
    s = score.parse_scorer("cost=/models/beaver-cost:-1")
    assert (s.name, s.path, s.sign, s.kind) == ("cost", "/models/beaver-cost", -1.0, "classifier")
    assert score.parse_scorer("r=/m/rm").sign == 1.0
    a = score.parse_arm_scorer("help=/m/arm,beta_r=0.05")
    assert (a.kind, a.beta_r, a.sign) == ("arm", 0.05, 1.0)
    assert score.parse_templates(["r=USER: {prompt} ASSISTANT:{response}"]) == {
        "r": "USER: {prompt} ASSISTANT:{response}"}
    for bad in ["nopath", "x=/m:2"]:
        with pytest.raises(ValueError):
            score.check_scorers([score.parse_scorer(bad)])


# ----------------------------------------------------------------------------- report


def fixed_table():
    """Three settings, four prompts, a reward r (higher better) and a cost c (lower better)."""
    r = {"A": [1, 2, 3, 4], "B": [2, 2, 2, 2], "C": [0, 1, 1, 2]}
    c = {"A": [1, 1, 1, 1], "B": [0, 0, 0, 0], "C": [2, 2, 2, 2]}
    rows = []
    for i in range(4):
        for name, beta in [("A", 1.0), ("B", 0.5), ("C", 0.25)]:
            rows.append({"prompt": f"p{i}", "setting": name, "beta": beta, "weights": [1, 0],
                         "prompt_index": i, "generated_token_ids": [1] * (i + 1),
                         "scores": {"r": r[name][i], "c": c[name][i]}})
    rows.append({"prompt": "p9", "setting": "C", "prompt_index": 9, "error": "failed"})
    return rows, r, c


def hand_bootstrap(values, resamples=2000, seed=0):
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[idx].mean(axis=1)
    return values.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5)


def test_report_figures_match_a_hand_computation(tmp_path):
    rows, r, c = fixed_table()
    text = report.write_report(rows, tmp_path / "rep", signs={"c": -1.0}, baseline="A",
                               win_scorer="r", seed=0)
    data = json.loads((tmp_path / "rep.json").read_text())
    table = {e["setting"]: e for e in data["table"]}
    for name in "ABC":
        for score_name, values in [("r", r[name]), ("c", c[name])]:
            mean, low, high = hand_bootstrap(values)
            cell = table[name][score_name]
            assert (cell["mean"], cell["low"], cell["high"]) == pytest.approx(
                (round(mean, 4), round(low, 4), round(high, 4)))
    assert table["A"]["r"]["mean"] == 2.5 and table["C"]["n"] == 4 and table["C"]["failed"] == 1
    assert table["A"]["mean_tokens"] == 2.5
    # Pareto over r (up) and c (down): A (2.5, 1) and B (2, 0) trade off; C (1, 2) is
    # dominated by both.
    assert [table[n]["pareto"] for n in "ABC"] == [True, True, False]
    wins = {w["setting"]: w for w in data["win_rates"]}
    # B vs A under r: 2>1 win, 2=2 tie, 2<3, 2<4 losses: (1 + 0.5) / 4.
    assert (wins["B"]["wins"], wins["B"]["ties"], wins["B"]["losses"]) == (1, 1, 2)
    mean, low, high = hand_bootstrap([1, 0.5, 0, 0])
    assert wins["B"]["win_rate"] == pytest.approx(
        {"mean": 0.375, "low": round(low, 4), "high": round(high, 4)})
    assert wins["C"]["win_rate"]["mean"] == 0.0 and "A" not in wins
    md = (tmp_path / "rep.md").read_text()
    assert "| A | 1 | 1,0 | 4 | 2.50 [" in md and "| C | 0.25 | 1,0 | 4 (+1 failed) |" in md
    assert "c: lower is better" in md and "![Pareto front](rep.png)" in md
    assert (tmp_path / "rep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "win rate [95% CI]" in text


def test_pareto_front_on_a_hand_made_case():
    points = [(1, 5), (2, 4), (3, 3), (2, 2), (1, 4), (3, 3), (math.nan, 9)]
    assert report.pareto_front(points) == [True, True, True, False, False, True, False]
    # Second coordinate a cost (lower better): (2, 2) and the two (3, 3) trade off.
    assert report.pareto_front(points, (1, -1)) == [False, False, True, True, False, True, False]
    assert report.pareto_front([(0, 0)]) == [True]


def test_report_cli_reads_signs_from_the_scored_file(tmp_path, capsys):
    rows, _, _ = fixed_table()
    scored = write_jsonl(tmp_path / "scored.jsonl", rows)
    settings_path(scored).write_text(json.dumps({"scorers": [
        {"name": "r", "sign": 1.0}, {"name": "c", "sign": -1.0}]}))
    assert main(["report", str(scored), "--baseline", "B"]) == 0
    out = capsys.readouterr().out
    assert "c: lower is better" in out and "vs B: wins" in out
    data = json.loads((tmp_path / "scored.report.json").read_text())
    assert data["signs"] == {"r": 1.0, "c": -1.0} and data["pareto"] == ["r", "c"]
    assert main(["report", str(scored), "--pareto", "r,zz"]) == 2
    assert "no score named 'zz'" in capsys.readouterr().err


@pytest.mark.slow
def test_score_cli_runs_each_model_in_its_own_process(reward_models, tiny, tmp_path):
    infile = write_jsonl(tmp_path / "in.jsonl", SCORED_ROWS[:3])
    out = tmp_path / "scored.jsonl"
    args = ["score", "--input", infile, "--output", out,
            "--scorer", f"rm={reward_models['rm_chat']}",
            "--scorer", f"cost={reward_models['rm_plain']}:-1",
            "--template", "cost=USER: {prompt} ASSISTANT:{response}",
            "--arm-scorer", f"arm={tiny['arm_small']},beta_r=0.05",
            "--max-model-len", "256", "--enforce-eager"]
    result = subprocess.run([sys.executable, "-m", "genarm_vllm.cli", *map(str, args)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    got = read_jsonl(out)
    assert [sorted(r["scores"]) for r in got[:2]] == [["arm", "cost", "rm"]] * 2
    # The template: what the cost model read.
    want = hf_reward(reward_models["rm_plain"], ["USER: the cat sat on ASSISTANT: the mat and"])
    assert got[0]["scores"]["cost"] == pytest.approx(want[0], rel=1e-4, abs=1e-4)
    assert "--template needs rows with a \"prompt\"" in got[2]["error"]
    rerun = subprocess.run([sys.executable, "-m", "genarm_vllm.cli", *map(str, args)],
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "nothing to do" in rerun.stdout
