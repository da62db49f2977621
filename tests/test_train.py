"""`genarm-vllm train-arm` on transformers.Trainer: the GenARM loss (float64 check through the
trainer), masking and padding, the row layouts (plain, UltraFeedback messages, HH-RLHF), learning
a synthetic preference in every mode and from every source, guided generation with the trained
ARMs, checkpoint / resume, LoRA adapter folders (the engine serves them) and merging, recipes,
and bad-data errors."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from vllm import SamplingParams

from genarm_vllm import training
from genarm_vllm.cli import build_parser, main
from genarm_vllm.reference import ReferenceDecoder
from genarm_vllm.testing import PROMPTS, WORDS, build_model, build_tokenizer
from genarm_vllm.tokenization import prompt_ids, response_ids
from genarm_vllm.training import merge_adapter, train_arm
from genarm_vllm.training.data import Pair, collate, encode_pair
from genarm_vllm.training.loss import arm_preference_loss, pair_logps, response_logps
from genarm_vllm.training.options import (
    METRICS_FILE,
    RECIPES,
    TrainOptions,
    options_from_args,
    resolve_options,
)
from genarm_vllm.training.trainer import arm_trainer_class, training_arguments

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


def conversation_rows(num_rows, seed):
    """The same preference as whole conversations sharing a prompt: even rows as chat message
    lists (UltraFeedback binarized: the prompt string repeated as the first user turn), odd
    rows as HH-RLHF strings, some of both with an earlier exchange."""
    rows = []
    for i, row in enumerate(preference_rows(num_rows, seed)):
        earlier = i % 3 == 0
        if i % 2 == 0:
            turns = [{"role": "user", "content": row["prompt"]}]
            if earlier:
                turns = [{"role": "user", "content": "hello"},
                         {"role": "assistant", "content": "a nice day"}] + turns
            rows.append({
                "prompt": row["prompt"],
                "chosen": turns + [{"role": "assistant", "content": row["chosen"]}],
                "rejected": turns + [{"role": "assistant", "content": row["rejected"]}],
            })
        else:
            prompt = ("\n\nHuman: hello\n\nAssistant: a nice day" if earlier else "")
            prompt += f"\n\nHuman: {row['prompt']}\n\nAssistant:"
            rows.append({"chosen": f"{prompt} {row['chosen']}", "rejected": f"{prompt} {row['rejected']}"})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def state_dict(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def accuracy(model_dir, rows, chat_template=False):
    """Share of rows where the saved ARM gives the chosen response the higher summed log-prob."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pairs = [encode_pair(r, tokenizer, 512, chat_template) for r in rows]
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
    """A full fine-tune from JSONL through the CLI, as a user runs it; (ARM folder, exit code)."""
    out = tmp_path_factory.mktemp("arm_full") / "arm"
    code = main(["train-arm", "--init", str(arm_init), "--data", str(prefs), "--out", str(out),
                 "--base", str(tiny["base"]), "--epochs", "3", "--lr", "1e-3", "--batch-size", "4",
                 "--grad-accum", "2", "--eval-fraction", "0.2", "--seed", "1"])
    return out, code


@pytest.fixture(scope="module")
def trained_ds(arm_init, tmp_path_factory):
    """Top-layers mode from a datasets folder (Python API); (ARM folder, metrics)."""
    import datasets

    root = tmp_path_factory.mktemp("arm_ds")
    data = root / "prefs_ds"
    datasets.Dataset.from_list(preference_rows(200, seed=0)).save_to_disk(str(data))
    out = root / "arm"
    metrics = train_arm(arm_init, data, out, mode="top-layers", top_layers=1, epochs=3, lr=1e-3,
                        batch_size=8, eval_fraction=0.2, progress=False)
    return out, metrics


@pytest.fixture(scope="module")
def trained_chat(arm_init, tmp_path_factory):
    """LoRA from conversation rows (messages and HH-RLHF), chat template, merged into a full
    folder (the init is not the base), adapter kept."""
    root = tmp_path_factory.mktemp("arm_chat")
    data = write_jsonl(root / "conversations.jsonl", conversation_rows(200, seed=0))
    out = root / "arm"
    metrics = train_arm(arm_init, data, out, mode="lora", lora_targets="q_proj,v_proj,o_proj",
                        epochs=2, lr=3e-3, batch_size=8, eval_fraction=0.2, merge=True,
                        save_adapter=True, chat_template=True, progress=False)
    return out, metrics


@pytest.fixture(scope="module")
def trained_lora(tiny, prefs, tmp_path_factory):
    """LoRA on the base itself (GenARM's recipe) through the CLI, default output: the ARM
    folder is the adapter; (ARM folder, exit code)."""
    out = tmp_path_factory.mktemp("arm_lora") / "arm"
    code = main(["train-arm", "--init", str(tiny["base"]), "--data", str(prefs), "--out", str(out),
                 "--base", str(tiny["base"]), "--mode", "lora", "--lora-targets",
                 "q_proj,v_proj,o_proj,down_proj", "--epochs", "2", "--lr", "3e-3",
                 "--batch-size", "8", "--eval-fraction", "0.2", "--seed", "1"])
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


@pytest.mark.parametrize("gamma", [0.0, 0.7])
def test_trainer_loss_on_a_batch_equals_float64_hand_computation(arm_init, tmp_path, gamma):
    """ARMTrainer.compute_loss (the loss transformers.Trainer backpropagates) on a real batch
    against the GenARM loss computed by hand in float64: per-token log-softmax over the
    tokenizer's vocabulary, summed over response tokens only, then -log sigmoid."""
    tokenizer = AutoTokenizer.from_pretrained(arm_init)
    model = AutoModelForCausalLM.from_pretrained(arm_init)
    with torch.no_grad():  # a trained-looking model: rewards far apart
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    beta_r = 0.3
    opts = resolve_options(beta_r=beta_r, gamma=gamma, device="cpu")
    args = training_arguments(opts, tmp_path, has_eval=False, resuming=False, progress=False)
    trainer = arm_trainer_class()(model=model, args=args, beta_r=beta_r, gamma=gamma,
                                  vocab_size=len(tokenizer))
    pairs = [encode_pair(r, tokenizer, 512, False) for r in preference_rows(6, seed=4)]
    batch = collate(pairs, tokenizer.pad_token_id)
    got = trainer.compute_loss(model, batch).item()

    reference = AutoModelForCausalLM.from_pretrained(arm_init).double()
    reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    want = []
    with torch.no_grad():
        for pair in pairs:
            rewards = []
            for response in (pair.chosen_ids, pair.rejected_ids):
                ids = pair.prompt_ids + response
                logits = reference(torch.tensor([ids])).logits[0, :, : len(tokenizer)]
                logps = torch.log_softmax(logits, -1)
                start = len(pair.prompt_ids)
                rewards.append(sum(logps[start + j - 1, t].item() for j, t in enumerate(response)))
            z = beta_r * (rewards[0] - rewards[1]) - gamma
            want.append(max(-z, 0.0) + math.log1p(math.exp(-abs(z))))
    want = sum(want) / len(want)
    assert abs(want) > 0.05
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


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
    """A real model: right padding with the attention mask, logits kept only from the first
    scored position on, and normalisation over the tokenizer's vocabulary (12 padded ids)."""
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


# ----------------------------------------------------------------------------- row layouts


def test_tokenization_prompt_then_response_then_eos(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    row = {"prompt": "the cat sat", "chosen": "on the mat", "rejected": "under a tree"}
    pair = encode_pair(row, tokenizer, 512, False)
    assert pair.prompt_ids == prompt_ids(tokenizer, prompt="the cat sat")
    assert pair.prompt_ids == tokenizer("the cat sat").input_ids
    assert pair.chosen_ids == response_ids(tokenizer, "on the mat")
    assert pair.chosen_ids == (tokenizer("on the mat", add_special_tokens=False).input_ids
                               + [tokenizer.eos_token_id])
    # The chat template renders the prompt as one user message ready for the answer.
    pair = encode_pair(row, tokenizer, 512, True)
    assert pair.prompt_ids == tokenizer("user: the cat sat assistant: ", add_special_tokens=False).input_ids
    assert pair.prompt_ids != tokenizer("the cat sat").input_ids
    # max_length cuts responses after the prompt (and their EOS), never the prompt.
    pair = encode_pair(row, tokenizer, 5, False)
    assert (pair.prompt_ids, pair.chosen_ids, pair.truncated) == (
        tokenizer("the cat sat").input_ids, tokenizer("on the", add_special_tokens=False).input_ids, True)


def test_conversation_rows_split_off_the_shared_prompt(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "a nice day"},
             {"role": "user", "content": "the cat sat"}]
    want = (prompt_ids(tokenizer, messages=turns), response_ids(tokenizer, "on the mat"),
            response_ids(tokenizer, "under a tree"))
    ultrafeedback = {"prompt": "the cat sat",
                     "chosen": turns + [{"role": "assistant", "content": "on the mat"}],
                     "rejected": turns + [{"role": "assistant", "content": "under a tree"}]}
    trl_style = {"prompt": turns, "chosen": [{"role": "assistant", "content": "on the mat"}],
                 "rejected": [{"role": "assistant", "content": "under a tree"}]}
    for row in (ultrafeedback, trl_style):
        for chat_template in (False, True):  # chat rows always use the template
            pair = encode_pair(row, tokenizer, 512, chat_template)
            assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == want
    prompt = "\n\nHuman: hello\n\nAssistant: a nice day\n\nHuman: the cat sat\n\nAssistant:"
    hh = {"chosen": prompt + " on the mat", "rejected": prompt + " under a tree"}
    pair = encode_pair(hh, tokenizer, 512, False)  # the raw text, as the official HH ARMs
    assert pair.prompt_ids == prompt_ids(tokenizer, prompt=prompt)
    assert pair.chosen_ids == response_ids(tokenizer, " on the mat")
    pair = encode_pair(hh, tokenizer, 512, True)  # the turns through the chat template
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == want


def test_conversation_rows_that_fit_no_layout_say_what_was_expected(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    user = {"role": "user", "content": "the cat"}
    cases = [
        ({"chosen": "sat on the mat", "rejected": "ran"}, "missing field(s) prompt; rows must be"),
        ({"chosen": [user, {"role": "assistant", "content": "sat"}], "rejected": [user]},
         "'rejected' is not a list of chat messages"),
        ({"chosen": [user, {"role": "assistant", "content": "sat"}],
          "rejected": [{"role": "user", "content": "a dog"}, {"role": "assistant", "content": "ran"}]},
         "differ before their last assistant turn"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
         "must share the prompt"),
        ({"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: d"},
         "'chosen' response is empty"),
        ([1, 2], "expected an object, got list; rows must be"),
    ]
    for row, message in cases:
        with pytest.raises(ValueError, match=None) as error:
            encode_pair(row, tokenizer, 512, False)
        assert message in str(error.value), (row, str(error.value))


# ----------------------------------------------------------------------------- training


def test_full_training_learns_the_preference(trained, arm_init):
    out, code = trained
    assert code == 0
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["args"]["mode"] == "full" and metrics["args"]["beta_r"] == 0.1
    assert metrics["args"]["init"] == str(arm_init) and metrics["args"]["grad_accum"] == 2
    assert (metrics["num_train_pairs"], metrics["num_eval_pairs"]) == (160, 40)
    assert metrics["optimizer_steps"] == 3 * 20  # 160 pairs / (4 x 2 accumulated) per step
    # Held-out metrics before training (step 0) and after each epoch.
    assert [(e["epoch"], e["step"]) for e in metrics["eval"]] == [(0, 0), (1, 20), (2, 40), (3, 60)]
    start, end = metrics["eval"][0], metrics["eval"][-1]
    assert start["accuracy"] < 0.75  # the init does not know the preference
    assert end["accuracy"] >= 0.9 and end["mean_margin"] > start["mean_margin"] + 5
    assert end["loss"] < start["loss"] - 0.2
    losses = [e["loss"] for e in metrics["train_log"]]
    assert losses[-1] < losses[0] - 0.2
    assert not (out / "checkpoints").exists()  # removed once the run finished
    # The folder is a plain model with the tokenizer; its scores are the trained ones.
    vocab = AutoTokenizer.from_pretrained(arm_init).get_vocab()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == vocab
    held_out = preference_rows(60, seed=7)
    assert accuracy(arm_init, held_out) < 0.75 and accuracy(out, held_out) >= 0.9


def test_top_layers_mode_from_a_datasets_folder(arm_init, trained_ds):
    out, metrics = trained_ds
    assert metrics["eval"][0]["accuracy"] < 0.75 and metrics["eval"][-1]["accuracy"] >= 0.9
    before, after = state_dict(arm_init), state_dict(out)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # Only the top layer and the final norm train: embeddings, lm_head, layer 0 stay.
    assert changed and all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in changed)
    assert "model.norm.weight" in changed
    assert accuracy(out, preference_rows(60, seed=7)) >= 0.9


def test_lora_with_merge_from_conversation_rows_merged_folder_equals_adapter(arm_init, trained_chat,
                                                                             tmp_path):
    from peft import PeftModel

    out, metrics = trained_chat
    assert metrics["eval"][0]["accuracy"] < 0.75 and metrics["eval"][-1]["accuracy"] >= 0.9
    assert metrics["args"]["lora_targets"] == ["q_proj", "v_proj", "o_proj"]
    assert accuracy(out, conversation_rows(60, seed=7), chat_template=True) >= 0.9
    adapter = out / "lora_adapter"
    assert metrics["adapter_dir"] == str(adapter) and (adapter / "adapter_config.json").exists()
    assert not (adapter / "training_args.bin").exists()
    # --merge: a plain model folder: no LoRA weights, loads without peft.
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name in merged.state_dict())
    assert not (out / "adapter_config.json").exists()
    init = AutoModelForCausalLM.from_pretrained(arm_init).eval()
    ids = torch.tensor([[2, 10, 20, 30, 40, 11]])
    rebuilt = merge_adapter(arm_init, adapter, tmp_path / "rebuilt")
    with torch.no_grad():
        init_logits = init(ids).logits
        with_adapter = PeftModel.from_pretrained(init, adapter).eval()
        assert torch.allclose(merged(ids).logits, with_adapter(ids).logits, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, init_logits, atol=1e-3)  # it trained
        rebuilt_logits = AutoModelForCausalLM.from_pretrained(rebuilt).eval()(ids).logits
        assert torch.equal(rebuilt_logits, merged(ids).logits)
    assert (rebuilt / "tokenizer.json").exists()


def marker_engine(tiny, engine, trained, trained_ds, trained_chat, trained_lora):
    """One engine (built once) with the four trained ARMs: three full folders and the LoRA
    adapter folder, served as a LoRA ARM on the base's weights."""
    return engine("train-arm marker", base=tiny["base"], beta=1.0, reward_paths=[
        trained[0], trained_ds[0], trained_chat[0], trained_lora[0]])


@pytest.mark.slow  # an engine with four ARMs
def test_guided_generation_with_each_trained_arm_prefers_the_marker(tiny, engine, trained,
                                                                    trained_ds, trained_chat,
                                                                    trained_lora):
    """One engine, the three full ARMs (JSONL full, datasets top-layers, conversations LoRA
    merged), each switched on alone by per-request weights (2: beta 0.5), against the base alone."""
    llm = marker_engine(tiny, engine, trained, trained_ds, trained_chat, trained_lora)
    tokenizer = llm.get_tokenizer()
    marker_id = tokenizer.convert_tokens_to_ids(MARKER)
    rows = preference_rows(40, seed=11)
    plain = [row["prompt"] for row in rows]
    chat = [{"prompt_token_ids": prompt_ids(tokenizer, messages=[{"role": "user", "content": p}])}
            for p in plain]
    params = [SamplingParams(temperature=1.0, max_tokens=12, seed=i) for i in range(len(rows))]

    def marker_rate(prompts, weights):
        outputs = llm.generate(prompts, params, guidance={"weights": weights}, use_tqdm=False)
        return sum(marker_id in o.outputs[0].token_ids for o in outputs) / len(outputs)

    for prompts, weights in [(plain, [2.0, 0, 0, 0]), (plain, [0, 2.0, 0, 0]),
                             (chat, [0, 0, 2.0, 0])]:
        guided, base_alone = marker_rate(prompts, weights), marker_rate(prompts, [0.0, 0, 0, 0])
        assert guided >= base_alone + 0.4, (weights, guided, base_alone)


def test_lora_mode_writes_an_adapter_folder_the_engine_accepts(tiny, trained_lora, prefs, tmp_path):
    """Default --mode lora output: a PEFT adapter folder (no config.json, so the engine takes
    it as a LoRA ARM on the base's weights) with the tokenizer and the metrics; no merged copy."""
    from genarm_vllm.engine.lora_adapter import check_adapter, is_lora_adapter
    from genarm_vllm.engine.validation import check_reward_models

    out, code = trained_lora
    assert code == 0
    assert is_lora_adapter(out) and not (out / "config.json").exists()
    assert (out / "adapter_model.safetensors").is_file()
    assert not list(out.glob("model*.safetensors"))  # no full weights
    adapter = check_adapter(str(tiny["base"]), out)
    assert adapter.modules == ["q_proj", "v_proj", "o_proj", "down_proj"]
    check_reward_models(str(tiny["base"]), [str(out)])
    vocab = AutoTokenizer.from_pretrained(tiny["base"]).get_vocab()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == vocab
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["adapter_dir"] == str(out) and metrics["args"]["merge"] is False
    assert metrics["eval"][-1]["mean_margin"] > metrics["eval"][0]["mean_margin"]  # it trained
    assert not (out / "lora_adapter").exists() and not (out / "checkpoints").exists()
    # merge_adapter rebuilds the full ARM from it; writing a full ARM into it is refused.
    merged = merge_adapter(tiny["base"], out, tmp_path / "merged")
    assert (merged / "config.json").is_file() and not is_lora_adapter(merged)
    code = main(["train-arm", "--init", str(tiny["base"]), "--data", str(prefs), "--out", str(out),
                 "--mode", "lora", "--merge"])
    assert code == 2 and (out / "adapter_config.json").is_file()
    code = main(["train-arm", "--init", str(tiny["base"]), "--data", str(prefs), "--out",
                 str(merged), "--mode", "lora"])
    assert code == 2 and not (merged / "adapter_config.json").exists()


@pytest.mark.slow  # the engine of the marker test
def test_lora_adapter_arm_is_token_exact_in_the_engine(tiny, engine, trained, trained_ds,
                                                       trained_chat, trained_lora, tmp_path):
    """The adapter folder train-arm writes, served as a LoRA ARM on the base's weights, decodes
    greedily as the reference decoder does with the adapter merged into a full ARM."""
    llm = marker_engine(tiny, engine, trained, trained_ds, trained_chat, trained_lora)
    merged = merge_adapter(tiny["base"], trained_lora[0], tmp_path / "merged")
    reference = ReferenceDecoder(tiny["base"], [trained[0], trained_ds[0], trained_chat[0], merged],
                                 beta=1.0)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    guidance = {"weights": [0.0, 0.0, 0.0, 3.0]}
    got = [list(o.outputs[0].token_ids)
           for o in llm.generate(PROMPTS, greedy, guidance=guidance, use_tqdm=False)]
    want = reference.generate(PROMPTS, 16, guidance=guidance, ignore_eos=True)
    assert got == want
    assert want != ReferenceDecoder(tiny["base"]).generate(PROMPTS, 16, ignore_eos=True)  # it steers


class StopAfterCheckpoint(TrainerCallback):
    """Interrupts training (an exception, as a crash would) right after checkpoint `step`."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"interrupted after checkpoint {self.step}")


def test_resume_after_an_interruption_gives_the_uninterrupted_weights(arm_init, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(71, seed=2))  # 64 training pairs
    # LoRA with dropout: the resumed run must restore the optimizer, the schedule, the data
    # order and the RNG; 2 epochs of 8 steps, interrupted mid-way through the second.
    options = dict(mode="lora", epochs=2, lr=3e-3, batch_size=4, grad_accum=2, eval_fraction=0.1,
                   save_steps=5, seed=3, progress=False)
    whole = train_arm(arm_init, data, tmp_path / "whole", keep_checkpoints=True, **options)
    kept = sorted(p.name for p in (tmp_path / "whole" / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-15", "checkpoint-16"]  # every 5 steps and the last, 2 kept
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_arm(arm_init, data, out, callbacks=[StopAfterCheckpoint(10)], **options)
    assert (out / "checkpoints" / "checkpoint-10").is_dir() and not (out / METRICS_FILE).exists()
    code = main(["train-arm", "--init", str(arm_init), "--data", str(data), "--out", str(out),
                 "--resume", "--mode", "lora", "--epochs", "2", "--lr", "3e-3", "--batch-size", "4",
                 "--grad-accum", "2", "--eval-fraction", "0.1", "--save-steps", "5", "--seed", "3"])
    assert code == 0
    resumed = json.loads((out / METRICS_FILE).read_text())
    assert whole["optimizer_steps"] == resumed["optimizer_steps"] == 16
    # The held-out history spans both runs: before training, epoch 1 (first run), epoch 2.
    assert [e["step"] for e in resumed["eval"]] == [e["step"] for e in whole["eval"]] == [0, 8, 16]
    # The ARM folders are the LoRA adapters: their tensors are the trained weights.
    want, got = adapter_tensors(tmp_path / "whole"), adapter_tensors(out)
    assert want.keys() == got.keys() and want
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=0, atol=1e-6), name
    assert resumed["eval"][-1]["accuracy"] == pytest.approx(whole["eval"][-1]["accuracy"])


def test_trainer_flags_bf16_checkpointing_eval_steps_tensorboard(arm_init, prefs, tmp_path):
    out = tmp_path / "arm"
    metrics = train_arm(arm_init, prefs, out, mode="top-layers", top_layers=1, epochs=1, lr=1e-3,
                        batch_size=8, eval_fraction=0.2, precision="bf16", gradient_checkpointing=True,
                        eval_steps=8, logging_steps=4, report_to="tensorboard", device="cpu",
                        save_steps=10, progress=False)
    assert [e["step"] for e in metrics["eval"]] == [0, 8, 16, 20]
    assert [e["step"] for e in metrics["train_log"]][:3] == [1, 4, 8]
    # The checkpoints go once the run is over; the TensorBoard logs stay.
    assert not list((out / "checkpoints").glob("checkpoint-*"))
    assert list((out / "checkpoints" / "runs").rglob("events.out.tfevents.*"))
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32  # master weights


# ----------------------------------------------------------------------------- recipes


def parse_train_args(*flags):
    return build_parser().parse_args(["train-arm", "--init", "i", "--data", "d", "--out", "o", *flags])


def test_recipes_resolve_to_the_papers_hyperparameters():
    documented = {  # the paper (arXiv 2410.08193) and its official code
        "hh": dict(mode="lora", lora_r=8, lora_alpha=16, lora_dropout=0.05,
                   lora_targets=("q_proj", "k_proj", "v_proj"), beta_r=0.05, lr=5e-4, epochs=1,
                   lr_scheduler="cosine", warmup_steps=100, load_in_4bit="auto"),
        "ultrafeedback": dict(mode="full", beta_r=0.1, lr=5e-7, epochs=3),
        "pku-help": dict(mode="lora", lora_r=8, lora_alpha=16, beta_r=0.5, lr=5e-4, epochs=1),
        "pku-harm": dict(mode="lora", lora_r=8, lora_alpha=16, beta_r=0.01, lr=5e-4, epochs=1),
    }
    assert set(RECIPES) == set(documented)
    for name, want in documented.items():
        for opts in (resolve_options(name), resolve_options(**options_from_args(
                parse_train_args("--recipe", name)), recipe=name)):
            assert {k: getattr(opts, k) for k in want} == want, name
            assert opts.batch_size * opts.grad_accum == 32, name
            assert opts.gamma == 0.0
    # Any flag overrides the recipe; the others keep the recipe's values.
    args = parse_train_args("--recipe", "hh", "--lr", "1e-4", "--lora-targets", "q_proj,o_proj",
                            "--no-load-in-4bit", "--trainer-arg", "optim=adafactor")
    opts = resolve_options(args.recipe, **options_from_args(args))
    assert (opts.lr, opts.lora_targets, opts.load_in_4bit, opts.beta_r, opts.warmup_steps) == (
        1e-4, ("q_proj", "o_proj"), False, 0.05, 100)
    assert opts.trainer_args == {"optim": "adafactor"}
    # Without a recipe: the TrainOptions defaults.
    assert resolve_options(**options_from_args(parse_train_args())) == resolve_options()
    assert resolve_options().lr == 1e-5 and resolve_options(mode="lora").lr == 5e-4
    assert TrainOptions().beta_r == 0.1


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
    code, err = run_cli(capsys, *common, "--merge")
    assert code == 2 and "merge needs mode lora" in err
    code, err = run_cli(capsys, *common, "--mode", "lora", "--save-adapter")
    assert code == 2 and "save_adapter needs merge" in err
    code, err = run_cli(capsys, *common, "--data", tmp_path / "missing.jsonl")
    assert code == 2 and "does not exist" in err
    code, err = run_cli(capsys, *common, "--init", tmp_path / "no_model")
    assert code == 2 and f"cannot load model {tmp_path / 'no_model'}" in err
    code, err = run_cli(capsys, *common, "--precision", "fp16", "--device", "cpu")
    assert code == 2 and "precision fp16 needs a CUDA GPU" in err
    code, err = run_cli(capsys, *common, "--mode", "lora", "--load-in-4bit", "--device", "cpu")
    assert code == 2 and "load_in_4bit (QLoRA) needs a CUDA GPU and bitsandbytes" in err
    assert "--no-load-in-4bit" in err
    code, err = run_cli(capsys, *common, "--load-in-4bit")
    assert code == 2 and "load_in_4bit (QLoRA) needs mode lora" in err
    code, err = run_cli(capsys, *common, "--resume")
    assert code == 2 and "resume: no checkpoint-* folder in" in err
    code, err = run_cli(capsys, *common, "--trainer-arg", "no_such_field=1")
    assert code == 2 and "no_such_field not TrainingArguments field(s)" in err
    code, err = run_cli(capsys, *common, "--deepspeed", tmp_path / "missing.json")
    assert code == 2 and "is not a file" in err


def test_shipped_deepspeed_config_is_zero3():
    from pathlib import Path

    root = Path(training.__file__).parents[2]  # genarm_vllm/training/__init__.py
    config = json.loads((root / "launch" / "ds_zero3.json").read_text())
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["train_micro_batch_size_per_gpu"] == "auto"  # taken from the train-arm flags
