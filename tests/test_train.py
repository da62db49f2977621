"""`genarm-vllm train-arm`: the GenARM loss, masking and padding, learning a synthetic
preference in every mode, guided generation with the trained ARM, and bad-data errors."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm import SamplingParams

from genarm_vllm.cli import main
from genarm_vllm.testing import WORDS, build_model, build_tokenizer
from genarm_vllm.train import (
    METRICS_FILE,
    Pair,
    arm_preference_loss,
    collate,
    encode_pair,
    merge_adapter,
    pair_logps,
    response_logps,
    train_arm,
)

MARKER = "love"  # chosen responses contain it, rejected ones do not
OTHER_WORDS = [w for w in WORDS if w != MARKER]


def preference_rows(num_rows, seed):
    """Pairs that differ in one word: the marker (chosen) or a random other word (rejected)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        prompt = " ".join(rng.choices(OTHER_WORDS, k=rng.randint(2, 6)))
        rejected = rng.choices(OTHER_WORDS, k=rng.randint(3, 8))
        chosen = list(rejected)
        chosen[rng.randrange(len(chosen))] = MARKER
        rows.append({"prompt": prompt, "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def state_dict(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def accuracy(model_dir, rows):
    """Share of rows where the saved ARM gives the chosen response the higher summed log-prob."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pairs = [encode_pair(r, tokenizer, 512, False) for r in rows]
    with torch.no_grad():
        chosen, rejected = pair_logps(model, pairs, tokenizer.pad_token_id, len(tokenizer))
    return (chosen > rejected).float().mean().item()


@pytest.fixture(scope="module")
def arm_init(tiny, tmp_path_factory):
    """The ARM's starting point: a tiny LM with the base's tokenizer and a small initializer
    range, as real LMs have (the base's peaked random weights are a poor ARM init)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    return build_model(tmp_path_factory.mktemp("arm_init") / "init", tokenizer, seed=5,
                       vocab_padding=12, initializer_range=0.02)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", preference_rows(200, seed=0))


@pytest.fixture(scope="module")
def trained(tiny, arm_init, prefs, tmp_path_factory):
    """A full fine-tune through the CLI, as a user runs it; (ARM folder, exit code)."""
    out = tmp_path_factory.mktemp("arm_full") / "arm"
    code = main(["train-arm", "--init", str(arm_init), "--data", str(prefs), "--out", str(out),
                 "--base", str(tiny["base"]), "--epochs", "3", "--lr", "1e-3", "--batch-size", "4",
                 "--grad-accum", "2", "--eval-fraction", "0.2", "--seed", "1"])
    return out, code


# ----------------------------------------------------------------------------- loss, masking


def test_loss_matches_float64_formula():
    chosen = torch.tensor([-3.0, -50.0, -7.25, -400.0, -1.0], dtype=torch.float64)
    rejected = torch.tensor([-4.5, -2.0, -7.25, -1.0, -900.0], dtype=torch.float64)
    for beta_r, gamma in [(0.1, 0.0), (0.05, 0.5), (2.0, -1.0)]:
        want = []
        for c, r in zip(chosen.tolist(), rejected.tolist()):
            z = beta_r * (c - r) - gamma
            want.append(max(-z, 0.0) + math.log1p(math.exp(-abs(z))))  # -log sigmoid(z), stable
        got = arm_preference_loss(chosen, rejected, beta_r, gamma)
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        got32 = arm_preference_loss(chosen.float(), rejected.float(), beta_r, gamma)
        assert torch.allclose(got32.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5)
        assert torch.isfinite(got32).all()


def test_summed_response_logps_mask_prompt_and_padding():
    pairs = [
        Pair(prompt_ids=[5, 6, 7], chosen_ids=[8, 3], rejected_ids=[9, 10, 11, 3]),
        Pair(prompt_ids=[4], chosen_ids=[12, 13, 14, 15, 3], rejected_ids=[2]),
    ]
    batch = collate(pairs, pad_id=1)
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs]
    sequences += [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(a) + len(b) for a, b in sequences)
    for row, (prompt, response) in enumerate(sequences):  # right padding, masks, labels
        ids = prompt + response
        assert batch["input_ids"][row].tolist() == ids + [1] * (width - len(ids))
        assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * (width - len(ids))
        assert batch["labels"][row].tolist() == [-100] * len(prompt) + response + [-100] * (width - len(ids))

    torch.manual_seed(0)
    logits = torch.randn(len(sequences), width, 16) * 3
    for row, (prompt, response) in enumerate(sequences):
        logits[row, len(prompt) + len(response) - 1:] = 1e4  # padding (and past EOS) must not count
    got = response_logps(logits, batch["labels"])
    for row, (prompt, response) in enumerate(sequences):
        want = 0.0
        for j, token in enumerate(response):  # position len(prompt)+j-1 predicts response[j]
            scores = logits[row, len(prompt) + j - 1].double()
            want += (scores[token] - torch.logsumexp(scores, 0)).item()
        assert got[row].item() == pytest.approx(want, rel=1e-5)


def test_batched_pair_logps_equal_each_sequence_alone(tiny):
    """A real model: right padding with the attention mask, logits kept only from the shortest
    prompt on, and normalisation over the tokenizer's vocabulary (the base has 12 padded ids)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny["base"]).eval()
    pairs = [encode_pair(r, tokenizer, 512, False) for r in preference_rows(4, seed=3)]
    with torch.no_grad():
        chosen, rejected = pair_logps(model, pairs, tokenizer.pad_token_id, len(tokenizer))
        for pair, got_chosen, got_rejected in zip(pairs, chosen, rejected):
            for response, got in [(pair.chosen_ids, got_chosen), (pair.rejected_ids, got_rejected)]:
                ids = pair.prompt_ids + response
                logits = model(torch.tensor([ids])).logits[0, :, : len(tokenizer)].double()
                logps = torch.log_softmax(logits, -1)
                start = len(pair.prompt_ids)
                want = sum(logps[start + j - 1, t].item() for j, t in enumerate(response))
                assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-3)


def test_tokenization_prompt_then_response_then_eos(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    row = {"prompt": "the cat sat", "chosen": "on the mat", "rejected": "under a tree"}
    pair = encode_pair(row, tokenizer, 512, False)
    assert pair.prompt_ids == tokenizer("the cat sat").input_ids
    response_ids = tokenizer("on the mat", add_special_tokens=False).input_ids
    assert pair.chosen_ids == response_ids + [tokenizer.eos_token_id]
    # The chat template renders the prompt as one user message ready for the answer.
    pair = encode_pair(row, tokenizer, 512, True)
    assert pair.prompt_ids == tokenizer("user: the cat sat assistant: ", add_special_tokens=False).input_ids
    assert pair.prompt_ids != tokenizer("the cat sat").input_ids
    # max_length cuts responses after the prompt (and their EOS), never the prompt.
    pair = encode_pair(row, tokenizer, 5, False)
    assert (pair.prompt_ids, pair.chosen_ids, pair.truncated) == (
        tokenizer("the cat sat").input_ids, tokenizer("on the", add_special_tokens=False).input_ids, True)


# ----------------------------------------------------------------------------- training


def test_full_training_learns_the_preference(trained, arm_init, prefs):
    out, code = trained
    assert code == 0
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["args"]["mode"] == "full" and metrics["args"]["beta_r"] == 0.1
    assert metrics["args"]["init"] == str(arm_init) and metrics["args"]["grad_accum"] == 2
    assert (metrics["num_train_pairs"], metrics["num_eval_pairs"]) == (160, 40)
    assert [e["epoch"] for e in metrics["eval"]] == [0, 1, 2, 3]
    start, end = metrics["eval"][0], metrics["eval"][-1]
    assert start["accuracy"] < 0.75  # the init does not know the preference
    assert end["accuracy"] >= 0.9 and end["mean_margin"] > start["mean_margin"] + 5
    assert end["loss"] < start["loss"] - 0.2
    assert metrics["train_loss"][-1] < metrics["train_loss"][0] - 0.2
    assert len(metrics["step_loss"]) == 3 * 20  # 160 pairs / (4 x 2 accumulated) per step
    # The folder is a plain model with the tokenizer; its scores are the trained ones.
    vocab = AutoTokenizer.from_pretrained(arm_init).get_vocab()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == vocab
    held_out = preference_rows(60, seed=7)
    assert accuracy(arm_init, held_out) < 0.75 and accuracy(out, held_out) >= 0.9


def test_guided_generation_with_the_trained_arm_prefers_the_marker(tiny, engine, trained):
    out, _ = trained
    llm = engine("train-arm marker", base=tiny["base"], reward_paths=[out], beta=1.0)
    marker_id = llm.get_tokenizer().convert_tokens_to_ids(MARKER)
    prompts = [row["prompt"] for row in preference_rows(40, seed=11)]
    params = [SamplingParams(temperature=1.0, max_tokens=12, seed=i) for i in range(len(prompts))]

    def marker_rate(outputs):
        return sum(marker_id in o.outputs[0].token_ids for o in outputs) / len(outputs)

    guided = marker_rate(llm.generate(prompts, params))
    base_alone = marker_rate(llm.generate(prompts, params, guidance={"weights": [0.0]}))
    assert guided >= base_alone + 0.4, (guided, base_alone)


def test_top_layers_mode_from_a_datasets_folder(tiny, arm_init, tmp_path):
    import datasets

    data = tmp_path / "prefs_ds"
    datasets.Dataset.from_list(preference_rows(200, seed=0)).save_to_disk(str(data))
    out = tmp_path / "arm"
    metrics = train_arm(arm_init, data, out, mode="top-layers", top_layers=1, epochs=2, lr=1e-3,
                        batch_size=8, eval_fraction=0.2, progress=False)
    assert metrics["eval"][-1]["accuracy"] >= 0.9
    before, after = state_dict(arm_init), state_dict(out)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # Only the top layer and the final norm train: embeddings, lm_head, layer 0 stay.
    assert changed and all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in changed)
    assert "model.norm.weight" in changed


def test_lora_mode_saves_merged_model_and_adapter(tiny, arm_init, prefs, tmp_path):
    from peft import PeftModel

    out = tmp_path / "arm"
    metrics = train_arm(arm_init, prefs, out, mode="lora", lora_targets="q_proj,v_proj,o_proj",
                        epochs=2, lr=3e-3, batch_size=8, eval_fraction=0.2, save_adapter=True,
                        progress=False)
    assert metrics["eval"][-1]["accuracy"] >= 0.9
    assert metrics["args"]["lora_targets"] == ["q_proj", "v_proj", "o_proj"]
    adapter = out / "lora_adapter"
    assert metrics["adapter_dir"] == str(adapter) and (adapter / "adapter_config.json").exists()
    # A plain model folder: no LoRA weights, loads without peft.
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name in merged.state_dict())
    assert not (out / "adapter_config.json").exists()
    init = AutoModelForCausalLM.from_pretrained(arm_init).eval()
    ids = torch.tensor([[2, 10, 20, 30, 40, 11]])
    with torch.no_grad():
        init_logits = init(ids).logits
        with_adapter = PeftModel.from_pretrained(init, adapter).eval()
        assert torch.allclose(merged(ids).logits, with_adapter(ids).logits, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, init_logits, atol=1e-3)  # it trained
    rebuilt = merge_adapter(arm_init, adapter, tmp_path / "rebuilt")
    want = merged.state_dict()
    assert all(torch.allclose(t, want[n], atol=1e-6) for n, t in state_dict(rebuilt).items())
    assert (rebuilt / "tokenizer.json").exists()


# ----------------------------------------------------------------------------- bad data


def run_cli(capsys, *args):
    code = main(["train-arm", *map(str, args)])
    return code, capsys.readouterr().err


def test_bad_rows_are_reported_together_with_line_numbers(arm_init, tmp_path, capsys):
    good = {"prompt": "the cat", "chosen": "sat on the mat", "rejected": "ran"}
    lines = [
        json.dumps(good),
        json.dumps({"prompt": "a dog", "chosen": "ran"}),
        "",
        json.dumps({**good, "chosen": "  "}),
        json.dumps({**good, "rejected": 3}),
        json.dumps({**good, "prompt": " ".join(["the"] * 10)}),
        '{"prompt": "broken',
        json.dumps(good),
    ]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "arm"
    code, err = run_cli(capsys, "--init", arm_init, "--data", data, "--out", out, "--max-length", "8")
    assert code == 2
    assert "5 bad row(s)" in err
    assert "line 2: missing field(s) rejected" in err
    assert "line 4: 'chosen' response is empty" in err
    assert "line 5: 'rejected' must be a string, got int" in err
    assert "line 6: the prompt is 10 tokens: max_length 8 leaves no room" in err
    assert "line 7: not valid JSON" in err
    assert "line 1:" not in err and "line 8:" not in err
    assert not out.exists()  # nothing trained or written


def test_at_most_ten_bad_rows_are_listed(arm_init, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b"}] * 13)
    code, err = run_cli(capsys, "--init", arm_init, "--data", data, "--out", tmp_path / "arm")
    assert code == 2 and "13 bad row(s)" in err and "line 10:" in err and "line 11:" not in err
    assert "... and 3 more" in err


def test_bad_row_in_a_datasets_folder(arm_init, tmp_path, capsys):
    import datasets

    rows = preference_rows(3, seed=0)
    rows[1]["rejected"] = ""
    data = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(data))
    code, err = run_cli(capsys, "--init", arm_init, "--data", data, "--out", tmp_path / "arm")
    assert code == 2 and "row 2: 'rejected' response is empty" in err


def test_tokenizer_must_equal_the_bases(arm_init, prefs, tmp_path, capsys):
    other = tmp_path / "other_base"
    build_tokenizer(other, corpus_seed=1)  # the same words under other ids
    code, err = run_cli(capsys, "--init", arm_init, "--data", prefs, "--out", tmp_path / "arm",
                        "--base", other)
    assert code == 2 and "different tokenizer" in err and str(other) in err


def test_bad_options_exit_2(arm_init, prefs, tmp_path, capsys):
    common = ["--init", arm_init, "--data", prefs, "--out", tmp_path / "arm"]
    code, err = run_cli(capsys, *common, "--mode", "top-layers", "--top-layers", "3")
    assert code == 2 and "exceeds the model's 2 decoder layers" in err
    code, err = run_cli(capsys, *common, "--beta-r", "0")
    assert code == 2 and "beta_r must be a finite number > 0" in err
    code, err = run_cli(capsys, *common, "--save-adapter")
    assert code == 2 and "save_adapter needs mode lora" in err
    code, err = run_cli(capsys, *common, "--data", tmp_path / "missing.jsonl")
    assert code == 2 and "does not exist" in err
    code, err = run_cli(capsys, *common, "--init", tmp_path / "no_model")
    assert code == 2 and f"cannot load model {tmp_path / 'no_model'}" in err
