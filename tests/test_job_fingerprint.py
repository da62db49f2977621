"""The batch job's settings fingerprint (genarm_vllm/jobs/fingerprint.py): models are known by
their content, so a model retrained in place is noticed; engine flags that change the rows
are in it."""

import json
import shutil

import pytest
import torch
from batch_rows import good_rows, write_jsonl
from safetensors.torch import load_file, save_file
from test_lora_arm import build_adapter
from vllm import SamplingParams

from genarm_vllm.cli import main, parse_engine_flags
from genarm_vllm.jobs.fingerprint import check_or_store, differences, job_settings, model_identity

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def retrain_in_place(folder, name="model.safetensors", tensor=None):
    """What `train-arm --out SAME_DIR` with the same architecture leaves: the same config,
    the same file names and sizes, other weight values (here: of one tensor only)."""
    path = folder / name
    weights = load_file(path)
    tensor = tensor or sorted(weights)[-1]
    weights[tensor] = weights[tensor] + 0.01 * torch.randn_like(weights[tensor])
    size = path.stat().st_size
    save_file(weights, path, metadata={"format": "pt"})
    assert path.stat().st_size == size


def test_a_reward_model_retrained_in_place_is_not_appended_to(tiny, tmp_path, capsys,
                                                                monkeypatch):
    arm = tmp_path / "arm"
    shutil.copytree(tiny["arm_small"], arm)
    infile = write_jsonl(tmp_path / "in.jsonl", good_rows(4))
    out = tmp_path / "out.jsonl"
    flags = ["--max-model-len", "256", "--enforce-eager", "--dtype", "float32"]
    # An interrupted job: its settings file and its first row.
    check_or_store(out, job_settings(tiny["base"], [arm], None, None, GREEDY,
                                     parse_engine_flags(flags)), has_rows=False)
    out.write_text(json.dumps({**good_rows(4)[0], "generated_text": "x",
                               "generated_token_ids": [1], "finish_reason": "length"}) + "\n")
    # A tensor in the middle of the file: config.json and every size stay as they were.
    config = (arm / "config.json").read_bytes()
    retrain_in_place(arm, tensor="model.layers.0.mlp.up_proj.weight")
    assert (arm / "config.json").read_bytes() == config

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine was started: the resume was not refused")

    monkeypatch.setattr("genarm_vllm.engine.llm.GuidedLLM", no_engine)
    code = main([str(a) for a in ["generate", "--base", tiny["base"], "--reward-model", arm,
                                  "--input", infile, "--output", out, "--max-tokens", "6",
                                  "--temperature", "0", "--ignore-eos", *flags]])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to append" in err, err
    assert f"reward_models[0]: {arm.resolve()} changed in place (model.safetensors)" in err
    assert len(out.read_text().splitlines()) == 1


def test_model_identity_follows_the_content_of_every_kind_of_model_folder(tiny, tmp_path):
    # A copy is the same model (its path aside); any tensor retrained, or a LoRA adapter
    # retrained, is another.
    base = tmp_path / "base"
    shutil.copytree(tiny["base"], base)
    before = model_identity(base)
    assert before["content_sha256"] == model_identity(tiny["base"])["content_sha256"]
    for tensor in ("model.norm.weight", "model.embed_tokens.weight"):  # smallest and largest
        retrain_in_place(base, tensor=tensor)
        after = model_identity(base)
        assert after["files"]["model.safetensors"] != before["files"]["model.safetensors"]
        assert after["files"]["config.json"] == before["files"]["config.json"]
        before = after
    adapter = build_adapter(tiny["base"], tmp_path / "lora", seed=1)
    first = model_identity(adapter)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(first["files"])
    retrain_in_place(adapter, "adapter_model.safetensors")
    assert model_identity(adapter)["content_sha256"] != first["content_sha256"]


@pytest.mark.parametrize("flag, value", [("--kv-cache-dtype", "fp8"),
                                         ("--hf-overrides", '{"rope_theta": 5000.0}')])
def test_engine_flags_that_change_the_rows_are_in_the_fingerprint(tiny, flag, value):
    plain = job_settings(tiny["base"], [tiny["arm_small"]], None, None, GREEDY, {})
    given = job_settings(tiny["base"], [tiny["arm_small"]], None, None, GREEDY,
                         parse_engine_flags([flag, value]))
    name = "engine." + flag.lstrip("-").replace("-", "_")
    assert name in plain and plain[name] != given[name]


def test_the_self_reward_model_is_the_bases_weights_in_the_fingerprint(tiny, tmp_path):
    # "self" names no folder: the base's identity covers it, and a retrained base changes it.
    base = tmp_path / "base"
    shutil.copytree(tiny["base"], base)
    before = job_settings(base, ["self", tiny["arm_small"]], None, None, GREEDY, {})
    assert before["reward_models"][0] == {"path": "self"}
    retrain_in_place(base, tensor="model.norm.weight")
    after = job_settings(base, ["self", tiny["arm_small"]], None, None, GREEDY, {})
    assert differences(before, after) and after["reward_models"][0] == {"path": "self"}
