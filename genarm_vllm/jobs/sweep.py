"""`genarm-vllm sweep`: every prompt under every guidance setting of a grid, as ONE batch job.

A multi-objective study runs the same prompts under many (beta, weights) settings. Run as
one `generate` job per setting, each job starts its own engine and prefills every prompt
again. The sweep instead expands each input row into one row per setting, prompt-major
(all settings of prompt 1, then of prompt 2, ...), and runs the expanded rows through the
batch job itself (batch.run_job, or ray_job.run_ray_job): error rows, input order, resume
after any interruption, the settings fingerprint, progress and Ray all hold as for
`generate`. The rows of one prompt enter the engine one after the other, so their shared
prompt is prefilled once and then found in vLLM's prefix cache (full KV blocks only: 128
tokens on CPU, 16 on GPU).

An expanded row is the input row plus
    "setting"       the setting's name,
    "beta"          its beta (absent when the setting leaves beta to the engine default),
    "weights"       its weights (absent likewise),
    "temperature"   its sampling temperature (absent when it keeps the job's: a setting
                    such as "the base alone, sharpened" differs in sampling, not guidance),
    "prompt_index"  the input row's position among the input's rows (from 0): the key that
                    pairs the settings' answers to one prompt (`genarm-vllm report`).
An input row that already holds one of these fields is refused before anything runs (the
grid decides the guidance). A line that is not a row (bad JSON, not an object, a field the
output writes itself) is passed on once, as it is, and becomes one error row.

The expanded rows are written, streamed, to a file next to the output
(`OUTPUT.sweep-input.jsonl`, or `expanded_path`), rewritten identically at every run and
deleted when the job completes: the batch job reads its input more than once (the row
count, the resume check) and Ray's readers read files, so a file is what both take. Error
rows name that file's lines; each such row carries its setting and prompt_index.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from genarm_vllm.jobs.batch import (
    OUTPUT_FIELDS,
    REORDER_BUFFER,
    check_temperature,
    input_files,
    read_lines,
)

SWEEP_FIELDS = ("setting", "beta", "weights", "temperature", "prompt_index")
EXPANDED_SUFFIX = ".sweep-input.jsonl"


@dataclass(frozen=True)
class Setting:
    """One point of the grid: a name and the guidance it gives every prompt (None: the
    engine's default beta / weights), and optionally a sampling temperature of its own
    (None: the job's SamplingParams.temperature)."""

    name: str
    beta: float | None = None
    weights: tuple[float, ...] | None = None
    temperature: float | None = None

    def fields(self) -> dict:
        out = {"setting": self.name}
        if self.beta is not None:
            out["beta"] = self.beta
        if self.weights is not None:
            out["weights"] = list(self.weights)
        if self.temperature is not None:
            out["temperature"] = self.temperature
        return out


def _number_text(value: float) -> str:
    return f"{value:g}"


def setting_name(beta: float | None, weights: Sequence[float] | None,
                 temperature: float | None = None) -> str:
    parts = []
    if beta is not None:
        parts.append(f"beta={_number_text(beta)}")
    if weights is not None:
        parts.append("w=" + ",".join(_number_text(w) for w in weights))
    if temperature is not None:
        parts.append(f"T={_number_text(temperature)}")
    return " ".join(parts) or "default"


def parse_betas(text: str) -> list[float]:
    """--betas "1,0.5" -> [1.0, 0.5]."""
    try:
        return [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--betas: expected comma-separated numbers, got {text!r}") from None


def parse_weight_grid(text: str) -> list[list[float]]:
    """--weights "1,0;0.5,0.5;0,1" -> [[1, 0], [0.5, 0.5], [0, 1]] (';' between settings)."""
    try:
        return [[float(w) for w in part.split(",")] for part in text.split(";") if part.strip()]
    except ValueError:
        raise ValueError(f"--weights: expected weight lists like '1,0;0.5,0.5', got {text!r}") from None


def grid(betas: Sequence[float] | None = None,
         weights: Sequence[Sequence[float]] | None = None) -> list[Setting]:
    """The product betas x weights, beta-major; a missing axis keeps the engine default."""
    betas = list(betas) if betas else [None]
    weight_lists = [tuple(float(w) for w in ws) for ws in weights] if weights else [None]
    return [Setting(setting_name(b, w), None if b is None else float(b), w)
            for b in betas for w in weight_lists]


def read_settings_file(path: str | os.PathLike) -> list[Setting]:
    """A JSON list (or JSONL) of {"name", "beta", "weights", "temperature"} objects; all
    optional."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(items, dict):
        items = items.get("settings", [items])
    settings = []
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict) or set(item) - {"name", "beta", "weights", "temperature"}:
            raise ValueError(f"{path}: setting {number} must be an object with name, beta, "
                             f"weights, temperature (each optional), got {item!r}")
        weights, temperature = item.get("weights"), item.get("temperature")
        settings.append(Setting(
            item.get("name") or setting_name(item.get("beta"), weights, temperature),
            None if item.get("beta") is None else float(item["beta"]),
            None if weights is None else tuple(float(w) for w in weights),
            None if temperature is None else float(temperature)))
    return settings


def check_settings(settings: Sequence[Setting], num_reward_models: int) -> list[Setting]:
    """Names unique, every beta and weight list valid for the engine: ValueError otherwise."""
    from genarm_vllm.guidance import check_beta, check_weights

    if not settings:
        raise ValueError("the sweep has no settings: give --betas and/or --weights, or --settings")
    seen = set()
    for s in settings:
        if not isinstance(s.name, str) or not s.name:
            raise ValueError(f"a setting needs a non-empty name, got {s.name!r}")
        if s.name in seen:
            raise ValueError(f"two settings are named {s.name!r}")
        seen.add(s.name)
        if s.beta is not None:
            check_beta(s.beta, f"setting {s.name!r}: beta")
        if s.weights is not None:
            check_weights(list(s.weights), num_reward_models, f"setting {s.name!r}: weights")
        if s.temperature is not None:
            check_temperature(s.temperature, f"setting {s.name!r}: temperature")
    return list(settings)


def settings_fingerprint(settings: Sequence[Setting]) -> list[dict]:
    """The grid as the job's fingerprint stores it (order matters: it orders the output)."""
    return [s.fields() for s in settings]


# ----------------------------------------------------------------------------- expansion


def expand_lines(lines: Iterator, settings: Sequence[Setting]) -> Iterator[str]:
    """The expanded JSONL lines (without newline) of input lines (batch.InputLine),
    streamed: one per setting for each row, prompt-major; blank lines dropped; a line that
    is not a row passed on once unchanged (the batch job makes it an error row)."""
    prompt_index = 0
    for item in lines:
        if not item.text.strip():
            continue
        try:
            row = json.loads(item.text)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or any(name in row for name in OUTPUT_FIELDS):
            prompt_index += 1
            yield item.text
            continue
        clash = [name for name in SWEEP_FIELDS if name in row]
        if clash:
            raise ValueError(
                f"{item.file} line {item.line}: the row holds {', '.join(map(repr, clash))}, "
                "which the sweep sets itself (the grid decides each row's guidance); drop or "
                "rename the field")
        for setting in settings:
            yield json.dumps({**row, **setting.fields(), "prompt_index": prompt_index},
                             ensure_ascii=False)
        prompt_index += 1


def expanded_path_for(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + EXPANDED_SUFFIX)


def write_expanded(input_path, settings: Sequence[Setting], path: str | os.PathLike) -> int:
    """Write the expanded rows of `input_path` to `path` (streamed, atomically replaced);
    returns how many lines it holds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in expand_lines(read_lines(input_files(input_path)), settings):
                f.write(line + "\n")
                count += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


# ----------------------------------------------------------------------------- prefix cache


@dataclass
class PrefixCacheCount:
    """Prompt tokens of the finished requests, and how many of them vLLM's prefix cache
    supplied (RequestOutput.num_cached_tokens)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 0

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else math.nan

    def line(self) -> str:
        return (f"prefix cache: {self.cached_tokens} of {self.prompt_tokens} prompt tokens "
                f"({100 * self.hit_rate:.0f} %) of {self.requests} requests came from vLLM's "
                "prefix cache")


class count_prefix_cache:
    """Counts prefix-cache hits of every request an engine finishes while in the `with`
    block: wraps the engine's `step` (on this engine object only), restored on exit."""

    def __init__(self, llm):
        self.engine = llm.llm.llm_engine if hasattr(llm, "llm") else llm.llm_engine
        self.count = PrefixCacheCount()

    def __enter__(self) -> PrefixCacheCount:
        step = self.engine.step
        count = self.count

        def counting_step():
            outputs = step()
            for output in outputs:
                if getattr(output, "finished", False):
                    count.requests += 1
                    count.prompt_tokens += len(output.prompt_token_ids or ())
                    count.cached_tokens += output.num_cached_tokens or 0
            return outputs

        self.engine.step = counting_step
        return self.count

    def __exit__(self, *exc) -> None:
        self.engine.__dict__.pop("step", None)


# ----------------------------------------------------------------------------- the job


@dataclass
class SweepSummary:
    job: object                      # the batch job's JobSummary
    settings: list[Setting]
    prefix_cache: PrefixCacheCount | None = None
    expanded_rows: int = 0
    extra: dict = field(default_factory=dict)

    def report(self) -> str:
        lines = [self.job.report()]
        if self.prefix_cache is not None and self.prefix_cache.requests:
            lines.append(self.prefix_cache.line())
        return "\n".join(lines)


def sweep_settings(job_settings: dict, settings: Sequence[Setting]) -> dict:
    """A batch job's fingerprint plus the grid."""
    return {**job_settings, "sweep.settings": settings_fingerprint(settings)}


def run_sweep(
    llm,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    sampling_params,
    settings: Sequence[Setting],
    *,
    job_settings: dict | None = None,
    expanded_path: str | os.PathLike | None = None,
    on_error: str = "continue",
    overwrite: bool = False,
    reorder_buffer: int = REORDER_BUFFER,
    max_in_flight: int | None = None,
    progress: bool = True,
    keep_expanded: bool = False,
) -> SweepSummary:
    """Run every input row under every setting on one GuidedLLM (batch.run_job); returns
    a SweepSummary (the job's totals and the prefix-cache hits).

    job_settings: the batch job's fingerprint (None: read off `llm`); the grid is added.
    """
    from genarm_vllm.jobs.batch import engine_settings, run_job

    settings = check_settings(settings, len(llm.reward_models))
    expanded = Path(expanded_path) if expanded_path else expanded_path_for(output_path)
    rows = write_expanded(input_path, settings, expanded)
    fingerprint = sweep_settings(job_settings or engine_settings(llm, sampling_params), settings)
    with count_prefix_cache(llm) as cache:
        summary = run_job(llm, expanded, output_path, sampling_params, settings=fingerprint,
                          on_error=on_error, overwrite=overwrite, reorder_buffer=reorder_buffer,
                          max_in_flight=max_in_flight, progress=progress)
    if not keep_expanded:
        expanded.unlink(missing_ok=True)
    return SweepSummary(summary, settings, cache, rows)
