"""The settings that decide a batch job's output, stored next to the output (resume safety).

A resumed job appends to rows an earlier run wrote; if any setting that decides the
output changed in between (a model, the default guidance, a sampling setting, the engine
dtype, the context length, a seed), the file would mix rows made two ways. So the first
run writes these settings to `<output>.settings.json`, and a later run refuses to append
unless its own settings are equal, naming every one that differs.

How a model is identified (model_identity): by its content, sampled, never by mtimes or
sizes. Retraining a model in place (`train-arm --out SAME_DIR`, same architecture) keeps
its config.json and every file size, and copying a folder changes every mtime, so neither
says whether the weights changed. What is hashed:

- every small file that decides the output in full: config.json, generation_config.json,
  adapter_config.json (a LoRA reward model's folder is a model too), the weight index
  files (*.index.json) and the tokenizer files;
- each safetensors file (model*.safetensors, adapter_model.safetensors): its size, its
  header in full (every tensor's name, dtype, shape and offsets) and, of every tensor,
  three blocks of its data of SAMPLE_BYTES each, at its start, middle and end (the whole
  tensor when it is smaller than that);
- other weight files (.bin, .pt, .gguf: no tensor table to read): in full up to
  FULL_HASH_BYTES, else SAMPLED_BLOCKS blocks spread evenly over the file, plus its size.

Why that is enough: training changes the trained tensors densely (every element of a full
fine-tune, of a top-layers tensor, of a merged LoRA's W + BA), and every tensor is sampled,
so a retrained tensor shows in its samples; a tensor untouched by training is the same
model. What it costs: the read is a few blocks per tensor, not the weights: about 750
tensors x 12 KiB (~9 MB) for a 70B checkpoint, whatever its size in GB. What it does not
see: a change confined to elements outside the samples of every tensor (not something
gradient training does) or to .bin/.pt/.gguf bytes between the sampled blocks of a file
over FULL_HASH_BYTES (use safetensors).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from genarm_vllm.guidance import SELF_MODEL

# Files hashed whole when a model folder holds them (small; each can change the output).
DECISIVE_FILES = (
    "config.json", "generation_config.json", "adapter_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SAMPLE_BYTES = 4096          # per sample of a safetensors tensor (3 per tensor)
FULL_HASH_BYTES = 64 << 20   # other weight files: hashed whole up to this size
SAMPLED_BLOCKS = 64          # ... else this many blocks of SAMPLE_BYTES, spread evenly

# SamplingParams fields that change what is generated (output_kind, extra_args and
# detokenisation details are set by the job itself or do not change the rows).
SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens",
    "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty", "stop",
    "stop_token_ids", "bad_words", "logprobs", "skip_special_tokens",
    "spaces_between_special_tokens", "include_stop_str_in_output", "logit_bias",
    "allowed_token_ids",
)

# vLLM engine settings that change what is generated. dtype and max_model_len are the
# effective ones (the user's, else GenARM's default: see engine.defaults.engine_defaults);
# kv_cache_dtype (an fp8 cache changes the numerics) and hf_overrides (the model's config)
# as given.
ENGINE_FIELDS = ("dtype", "max_model_len", "quantization", "seed", "tokenizer", "revision",
                 "generation_config", "kv_cache_dtype", "hf_overrides")


def settings_path(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".settings.json")


def model_identity(path: str | os.PathLike) -> dict:
    """A model folder as the fingerprint sees it: where it is and a hash of its content
    (see the module docstring for what is read, and why it is enough). The reward model
    "self" is the base's own weights, which the base's identity already covers."""
    if str(path) == SELF_MODEL:
        return {"path": SELF_MODEL}
    path = Path(path).resolve()
    files = {}
    if path.is_dir():
        for p in sorted(path.iterdir()):
            if not p.is_file():
                continue
            if p.name in DECISIVE_FILES or p.name.endswith(".index.json"):
                files[p.name] = _file_sha256(p)
            elif p.suffix in WEIGHT_SUFFIXES:
                files[p.name] = _weights_sha256(p)
    config = path / "config.json"
    return {
        "path": str(path),
        "config_sha256": files.get("config.json") if config.is_file() else None,
        "content_sha256": _digest(files),
        "files": files,
    }


def _digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_sha256(path: Path) -> str:
    """A weight file's content, sampled: see the module docstring."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}:".encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len <= size:
                header = f.read(header_len)
                digest.update(header)
                try:
                    tensors = json.loads(header)
                except ValueError:
                    tensors = None
                if isinstance(tensors, dict):
                    data_start = 8 + header_len
                    for name in sorted(tensors):
                        offsets = (tensors[name] or {}).get("data_offsets") \
                            if isinstance(tensors[name], dict) else None
                        if not offsets:
                            continue
                        begin, end = data_start + offsets[0], data_start + offsets[1]
                        for at in sorted({begin, max(begin, (begin + end) // 2 - SAMPLE_BYTES // 2),
                                          max(begin, end - SAMPLE_BYTES)}):
                            f.seek(at)
                            digest.update(f.read(min(SAMPLE_BYTES, end - at)))
                    return digest.hexdigest()
            f.seek(0)
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        else:
            step = (size - SAMPLE_BYTES) / (SAMPLED_BLOCKS - 1)
            for k in range(SAMPLED_BLOCKS):
                f.seek(int(k * step))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def job_settings(base, reward_models, beta, weights, sampling_params, engine_kwargs: dict,
                 own_chat_templates: bool | None = None) -> dict:
    """Everything that decides a row's output: the fingerprint of a job.

    beta / weights / own_chat_templates None take the defaults (1.0, 1.0 each, False, or a
    bundle's); engine_kwargs are vLLM LLM kwargs as given (GenARM's engine defaults fill in
    dtype and max_model_len).
    """
    from genarm_vllm.engine.defaults import engine_defaults
    from genarm_vllm.engine.validation import max_positions
    from genarm_vllm.guidance import genarm_fields

    _, guidance = genarm_fields(str(base), reward_models, beta, weights, own_chat_templates)
    engine = {**engine_kwargs, **engine_defaults(str(base), guidance.reward_models, engine_kwargs)}
    if engine.get("max_model_len") is None:
        engine["max_model_len"] = max_positions(str(base))
    for name, value in _vllm_defaults().items():  # what vLLM takes when nothing is given
        if engine.get(name) is None:
            engine[name] = value
    return {
        "base": model_identity(base),
        "reward_models": [model_identity(m) for m in guidance.reward_models],
        "beta": guidance.beta,
        "weights": guidance.weights,
        # Only when on: fingerprints of jobs from before the option stay equal.
        **({"own_chat_templates": True} if guidance.own_chat_templates else {}),
        **{f"sampling.{name}": _plain(getattr(sampling_params, name, None))
           for name in SAMPLING_FIELDS},
        **{f"engine.{name}": _plain(engine.get(name) or None if name == "hf_overrides"
                                    else engine.get(name))
           for name in ENGINE_FIELDS},
    }


def _vllm_defaults() -> dict:
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    return {f.name: f.default for f in dataclasses.fields(EngineArgs)
            if f.name in ENGINE_FIELDS and f.default is not dataclasses.MISSING}


def _plain(value):
    """A value as JSON keeps it (so a stored fingerprint compares equal to a new one)."""
    if value is not None and not isinstance(value, (bool, int, float, str, list, dict)):
        value = str(value).removeprefix("torch.")
    return json.loads(json.dumps(value, default=str))


def differences(stored: dict, current: dict) -> list[str]:
    """'name: stored -> current' for every setting that differs (for a model that stayed
    where it was: which of its files changed)."""
    names = list(dict.fromkeys([*stored, *current]))
    changed = []
    for name in names:
        old, new = stored.get(name), current.get(name)
        if old == new:
            continue
        if _is_model(old) and _is_model(new):
            changed.append(_model_change(name, old, new))
        elif (isinstance(old, list) and isinstance(new, list) and len(old) == len(new)
              and all(_is_model(m) for m in [*old, *new])):
            changed += [_model_change(f"{name}[{i}]", a, b)
                        for i, (a, b) in enumerate(zip(old, new)) if a != b]
        else:
            changed.append(f"{name}: {_short(old)} -> {_short(new)}")
    return changed


def _is_model(value) -> bool:
    return isinstance(value, dict) and "path" in value


def _model_change(name: str, old: dict, new: dict) -> str:
    if old["path"] != new["path"]:
        return f"{name}: {_short(old)} -> {_short(new)}"
    if "files" not in old:  # written by a version that fingerprinted sizes only
        return f"{name}: {old['path']} (fingerprinted by an older version, without its content)"
    old_files, new_files = old.get("files") or {}, new.get("files") or {}
    files = sorted(f for f in {*old_files, *new_files} if old_files.get(f) != new_files.get(f))
    return f"{name}: {old['path']} changed in place ({', '.join(files) or 'its content'})"


def _short(value) -> str:
    if _is_model(value):  # a model: its path says which
        return value["path"] + ("" if value.get("config_sha256") else " (no config)")
    if isinstance(value, list) and value and _is_model(value[0]):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return json.dumps(value)


def check_or_store(output: str | os.PathLike, settings: dict, has_rows: bool) -> None:
    """Before a job writes to `output`: store `settings` (a fresh output), or check them
    against the stored ones (a resume); ValueError naming every difference."""
    path = settings_path(output)
    if has_rows:
        if not path.is_file():
            raise ValueError(
                f"{output} holds rows but no settings file ({path.name}): it was not written "
                "by this version of the batch job, so a resume could mix settings; pass "
                "--overwrite to start afresh, or choose another --output")
        stored = json.loads(path.read_text())
        changed = differences(stored, settings)
        if changed:
            raise ValueError(
                f"{output} was written with other settings; refusing to append rows made "
                "differently. Changed: " + "; ".join(changed) + ". Re-run with the earlier "
                "settings, pass --overwrite to start afresh, or choose another --output")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)  # atomic: a kill leaves the old file or the new one
