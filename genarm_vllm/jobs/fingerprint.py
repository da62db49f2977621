"""The settings that decide a batch job's output, stored next to the output (resume safety).

A resumed job appends to rows an earlier run wrote; if any setting that decides the
output changed in between (a model, the default guidance, a sampling setting, the engine
dtype, the context length, a seed), the file would mix rows made two ways. So the first
run writes these settings to `<output>.settings.json`, and a later run refuses to append
unless its own settings are equal, naming every one that differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

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
# effective ones (the user's, else GenARM's default: see engine.defaults.engine_defaults).
ENGINE_FIELDS = ("dtype", "max_model_len", "quantization", "seed", "tokenizer", "revision",
                 "generation_config")


def settings_path(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".settings.json")


def model_identity(path: str | os.PathLike) -> dict:
    """A model folder as the fingerprint sees it: where it is, its config, its weight sizes.

    Cheap on any model size (no weights are read); retraining a model in place changes its
    config or its files' sizes in practice, copying it elsewhere changes its path.
    """
    path = Path(path).resolve()
    config = path / "config.json"
    sizes = {p.name: p.stat().st_size for p in sorted(path.iterdir())
             if p.suffix in (".safetensors", ".bin", ".pt", ".gguf")} if path.is_dir() else {}
    return {
        "path": str(path),
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "weight_bytes": sizes,
    }


def job_settings(base, reward_models, beta, weights, sampling_params, engine_kwargs: dict) -> dict:
    """Everything that decides a row's output: the fingerprint of a job.

    beta / weights None take the defaults (1.0, 1.0 each, or a bundle's); engine_kwargs are
    vLLM LLM kwargs as given (GenARM's engine defaults fill in dtype and max_model_len).
    """
    from genarm_vllm.engine.defaults import engine_defaults
    from genarm_vllm.engine.validation import max_positions
    from genarm_vllm.guidance import genarm_fields

    _, guidance = genarm_fields(str(base), reward_models, beta, weights)
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
        **{f"sampling.{name}": _plain(getattr(sampling_params, name, None))
           for name in SAMPLING_FIELDS},
        **{f"engine.{name}": _plain(engine.get(name)) for name in ENGINE_FIELDS},
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
    """'name: stored -> current' for every setting that differs."""
    names = list(dict.fromkeys([*stored, *current]))
    return [f"{name}: {_short(stored.get(name))} -> {_short(current.get(name))}"
            for name in names if stored.get(name) != current.get(name)]


def _short(value) -> str:
    if isinstance(value, dict) and "path" in value:  # a model: its path says which
        return value["path"] + ("" if value.get("config_sha256") else " (no config)")
    if isinstance(value, list) and value and isinstance(value[0], dict) and "path" in value[0]:
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
