"""The JSONL batch job behind `genarm-vllm generate`.

Input rows: {"prompt": str} or {"messages": [...]} (rendered with the base tokenizer's
chat template), plus optional per-row "beta", "weights", "prompts" (one entry per
reward model: the prompt it reads, genarm_vllm/prompts.py) and "temperature" (the row's
sampling temperature instead of the job's; 0 = greedy); the output's own field names
(OUTPUT_FIELDS) are refused as input fields. The input is one JSONL file,
or shards: a folder of *.jsonl files or a glob, read in sorted file name order, streamed
(memory does not grow with the input). Output rows, in input order, in one JSONL file
(blank input lines are skipped): every input field plus

- with SamplingParams n == 1 (the default): "generated_text", "generated_token_ids",
  "finish_reason", and "logprobs" when SamplingParams.logprobs is set;
- with n > 1: "samples", a list of n {"generated_text", "generated_token_ids",
  "finish_reason"[, "logprobs"]}, in vLLM's order of the samples.

"logprobs": one entry per generated token, {token id (a JSON string): log-probability},
holding the sampled token and the `logprobs` most likely ones (vLLM's
CompletionOutput.logprobs; GenARM engines return those of each row's own guided
distribution: engine.defaults.engine_defaults, logprobs_mode). output_line writes a row,
for the single-process job and the Ray replicas alike.

Bad rows: a row that cannot be generated becomes an error row, its input fields plus
"error" (the reason, with the input file and line), and the job goes on
(on_error="continue", the default); on_error="fail" stops at the first one instead.
Found before generation: bad JSON (the row is then {"input_line": <the text>, "error"}),
a row without one prompt, bad guidance, a prompt with no room to generate within
max_model_len (counted in tokens), a token id some model cannot embed; and whatever vLLM
refuses when the row is submitted.

Feeding and order: rows go into the engine one by one as others finish (feeding.py), so
the engine never drains; finished rows pass through a bounded reorder buffer (reorder.py)
into the output in input order.

Resume: the output is flushed as rows are written, so a re-run after any interruption
(kill -9 included) keeps the complete rows there, drops a torn last line and continues
after them; no row is written twice. The settings that decide the output are stored next
to it (fingerprint.py): a re-run with other settings refuses to append.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from genarm_vllm.guidance import row_guidance
from genarm_vllm.tokenization import prompt_ids

OUTPUT_FIELDS = ("generated_text", "generated_token_ids", "finish_reason", "logprobs",
                 "samples", "error")
# The one input field of the error row of a line that is not a JSON object.
RAW_LINE_FIELD = "input_line"
# What a job does with a row that cannot be generated: write an error row and go on, or stop.
ON_ERROR = ("continue", "fail")
# Rows that may wait in the reorder buffer for an earlier, longer one.
REORDER_BUFFER = 4096


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")


def input_files(path: str | os.PathLike) -> list[Path]:
    """The JSONL files of an input: a file, a folder of *.jsonl shards, or a glob."""
    path = str(path)
    if os.path.isfile(path):
        return [Path(path)]
    pattern = os.path.join(path, "*.jsonl") if os.path.isdir(path) else path
    files = sorted(Path(p) for p in glob.glob(pattern) if os.path.isfile(p))
    if not files:
        raise ValueError(f"no input: {path} is not a file, a folder of *.jsonl files, or a "
                         "glob matching files")
    return files


# ----------------------------------------------------------------------------- input lines


@dataclass
class InputLine:
    index: int  # position among all lines of the input (shards in order, blank ones too), from 0
    file: str
    line: int   # line number in its file, from 1
    text: str


def file_lines(binary: Iterable[bytes]) -> Iterator[str]:
    """The lines of a file opened in binary mode: split at \\n only (as JSONL is), decoded.

    One definition for the single-process reader, the line count and the Ray reader, so
    that a line index means the same line everywhere.
    """
    for raw in binary:
        yield raw.decode("utf-8", errors="replace").rstrip("\r\n")


def read_lines(files: list[Path], start: int = 0) -> Iterator[InputLine]:
    """Every line of `files` from position `start` on, streamed."""
    index = 0
    for file in files:
        with open(file, "rb") as f:
            for number, text in enumerate(file_lines(f), start=1):
                if index >= start:
                    yield InputLine(index, str(file), number, text)
                index += 1


# ----------------------------------------------------------------------------- rows


class RowError(ValueError):
    """Why one row cannot be generated; `kind` groups the reasons in the summary."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def check_row(row: object, num_reward_models: int) -> None:
    if not isinstance(row, dict):
        raise RowError("bad row", f"a row must be a JSON object, got {type(row).__name__}")
    if isinstance(row.get("prompt"), str) == isinstance(row.get("messages"), list):
        raise RowError("bad row",
                       'a row needs exactly one of "prompt" (a string) or "messages" (a list)')
    try:
        row_guidance(row, num_reward_models)
    except ValueError as e:
        raise RowError("bad guidance", str(e)) from None
    if "temperature" in row:
        try:
            check_temperature(row["temperature"])
        except ValueError as e:
            raise RowError("bad row", str(e)) from None


def check_temperature(value: object, name: str = "temperature") -> float:
    """A row's or a sweep setting's own sampling temperature: a finite number >= 0."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass
class ParsedLine:
    fields: dict            # what the output row keeps of the input
    row: dict | None        # the row, when it is a valid one
    error: RowError | None


def parse_line(item: InputLine, num_reward_models: int) -> ParsedLine | None:
    """A line as a row (None for a blank line), checked without a tokenizer."""
    if not item.text.strip():
        return None
    try:
        row = json.loads(item.text)
    except json.JSONDecodeError as e:
        return ParsedLine({RAW_LINE_FIELD: item.text}, None,
                          RowError("bad JSON", f"not valid JSON ({e})"))
    reserved = [name for name in OUTPUT_FIELDS if isinstance(row, dict) and name in row]
    if reserved:  # the output row would overwrite them: keep the line as it is
        return ParsedLine({RAW_LINE_FIELD: item.text}, None, RowError(
            "bad row", f"the row holds {', '.join(map(repr, reserved))}, a field the output "
            f"writes itself ({', '.join(OUTPUT_FIELDS)}); rename or drop it"))
    fields = row if isinstance(row, dict) else {RAW_LINE_FIELD: item.text}
    try:
        check_row(row, num_reward_models)
    except RowError as e:
        return ParsedLine(fields, None, e)
    return ParsedLine(fields, row, None)


def located(item: InputLine, error: Exception) -> str:
    return f"{item.file} line {item.line}: {error}"


def check_input(path: str | os.PathLike, num_reward_models: int) -> int:
    """The checks that need no model, over the whole input (streamed): the number of rows;
    ValueError naming every bad line (up to 10). For on_error="fail", before the engine starts."""
    rows, errors = 0, []
    for item in read_lines(input_files(path)):
        parsed = parse_line(item, num_reward_models)
        if parsed is None:
            continue
        rows += 1
        if parsed.error is not None:
            errors.append(located(item, parsed.error))
    if errors:
        more = f"\n... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise ValueError("invalid input rows:\n" + "\n".join(errors[:10]) + more)
    return rows


def count_rows(files: list[Path]) -> int:
    """Non-blank lines: the rows of the input (the progress bar's total)."""
    count = 0
    for file in files:
        with open(file, "rb") as f:
            count += sum(1 for raw in f if raw.strip())
    return count


class PromptBuilder:
    """A row's prompt as the engine takes it (token ids) and its guidance, with the checks
    that need the engine's tokenizer and limits."""

    def __init__(self, llm):
        self.tokenizer = llm.get_tokenizer()
        self.max_model_len = llm.llm.llm_engine.model_config.max_model_len
        self.id_limits = llm.prompt_id_limits
        self.num_reward_models = len(llm.reward_models)
        self.llm = llm

    def request(self, row: dict) -> tuple[dict, dict | None]:
        from genarm_vllm.engine.validation import check_prompt_ids

        try:
            ids = prompt_ids(self.tokenizer, row.get("prompt"), row.get("messages"))
        except ValueError as e:  # e.g. chat messages and no chat template
            raise RowError("bad row", str(e)) from None
        if len(ids) >= self.max_model_len:
            raise RowError(
                "prompt too long",
                f"the prompt is {len(ids)} tokens, which leaves no room to generate within "
                f"max_model_len={self.max_model_len} (at most {self.max_model_len - 1})")
        try:
            check_prompt_ids(ids, self.id_limits)
        except ValueError as e:
            raise RowError("id a model cannot embed", str(e)) from None
        guidance = row_guidance(row, self.num_reward_models)
        if "temperature" in row:  # EngineFeeder.add applies it
            guidance = {**(guidance or {}), "temperature": float(row["temperature"])}
        if row.get("messages") is not None:
            # Under own_chat_templates the row's models render its messages themselves
            # (carrier() below checks and encodes them).
            (guidance,) = self.llm.chat_guidance(guidance, [row["messages"]])
        if guidance is not None and guidance.get("prompts") is not None:
            return self.carrier(ids, guidance)
        return {"prompt_token_ids": ids}, guidance

    def carrier(self, ids: list[int], guidance: dict) -> tuple[dict, dict | None]:
        """A row whose models read prompts of their own (engine/carrier.py): the carrier
        prompt, and its guidance with "carrier" (EngineFeeder.add) for "prompts"."""
        from vllm import SamplingParams

        from genarm_vllm.engine.carrier import carrier_prompt
        from genarm_vllm.prompts import CARRIER_KEY, encode_prompts, has_own_prompts, same_as_base

        guidance = dict(guidance)
        entries = guidance.pop("prompts")
        try:
            encoded = encode_prompts(entries, self.llm.reward_tokenizers(),
                                     self.llm.reward_embedding_rows())
        except ValueError as e:
            raise RowError("bad prompts", str(e)) from None
        encoded = same_as_base(encoded, ids)
        if not has_own_prompts(encoded):
            return {"prompt_token_ids": ids}, guidance or None
        try:
            block_size = self.llm.llm.llm_engine.vllm_config.cache_config.block_size
            prompt, params = carrier_prompt(ids, encoded, SamplingParams(), self.max_model_len,
                                            block_size)
        except ValueError as e:
            raise RowError("prompt too long", str(e)) from None
        guidance["carrier"] = params.extra_args[CARRIER_KEY]
        return prompt, guidance


def _sample(completion) -> dict:
    sample = {
        "generated_text": completion.text,
        "generated_token_ids": list(completion.token_ids),
        "finish_reason": completion.finish_reason,
    }
    if completion.logprobs is not None:
        sample["logprobs"] = [
            {str(token_id): logprob.logprob for token_id, logprob in (position or {}).items()}
            for position in completion.logprobs]
    return sample


def output_line(row: dict, result) -> tuple[str, int]:
    """The output JSONL line of a row and its finished vllm.RequestOutput (layout: see the
    module docstring), and the number of tokens it generated (every sample's)."""
    outputs = sorted(result.outputs, key=lambda c: c.index)
    if len(outputs) == 1:
        fields = _sample(outputs[0])
    else:
        fields = {"samples": [_sample(c) for c in outputs]}
    line = json.dumps({**row, **fields}, ensure_ascii=False) + "\n"
    return line, sum(len(c.token_ids) for c in outputs)


def error_line(fields: dict, message: str) -> str:
    return json.dumps({**fields, "error": message}, ensure_ascii=False) + "\n"


def _input_part(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in OUTPUT_FIELDS}


# ----------------------------------------------------------------------------- resume


@dataclass
class JobStart:
    """Where a job starts, found by one pass over its input (prepare_job)."""

    start: int              # input position (InputLine.index) to continue from
    done: int               # rows the output holds already
    total: int              # rows of the input (non-blank lines)
    line_counts: list[int]  # lines per input file, blank ones too

    @property
    def finished(self) -> bool:
        return self.done == self.total


def _complete_rows(f) -> Iterator[tuple[bytes, dict]]:
    """The complete rows of an output file (binary), up to a torn or unreadable last line."""
    for raw in f:
        if not raw.endswith(b"\n"):
            return
        try:
            yield raw, json.loads(raw)
        except json.JSONDecodeError:
            return


def prepare_job(output: str | os.PathLike, settings: dict, files: list[Path],
                num_reward_models: int, *, overwrite: bool = False,
                check_rows: bool = False) -> JobStart:
    """Everything a job needs to know before its first row, in ONE pass over the input.

    Starts afresh (overwrite) or checks the stored settings of an output that holds rows
    (fingerprint.check_or_store); streams the input and the output side by side, checking
    that each output row belongs to its input row, and drops a torn last line; counts the
    input's rows and each file's lines. check_rows: also the checks that need no model, on
    every row (on_error="fail", before the engine starts): ValueError naming the bad lines
    (up to 10), and then neither the output nor its settings file is touched.
    """
    from genarm_vllm.jobs.fingerprint import check_or_store, settings_path

    output = Path(output)
    if overwrite:
        output.unlink(missing_ok=True)
        settings_path(output).unlink(missing_ok=True)
    has_rows = output.exists() and output.stat().st_size > 0
    if has_rows:
        check_or_store(output, settings, has_rows=True)
    counts, total, errors = [], 0, []
    start = done = keep_bytes = 0
    with open(output, "rb") if has_rows else io.BytesIO() as out:
        written = _complete_rows(out)
        matching = has_rows
        index = 0
        for file in files:
            lines = 0
            with open(file, "rb") as f:
                for lines, text in enumerate(file_lines(f), start=1):
                    index += 1
                    if not text.strip():
                        continue
                    total += 1
                    item, parsed = InputLine(index - 1, str(file), lines, text), None
                    if check_rows:
                        parsed = parse_line(item, num_reward_models)
                        if parsed.error is not None:
                            errors.append(located(item, parsed.error))
                    if matching:
                        row = next(written, None)
                        if row is None:
                            matching = False
                            continue
                        parsed = parsed or parse_line(item, num_reward_models)
                        if _input_part(row[1]) != parsed.fields:
                            raise _not_this_input(output, done, f"{item.file} line {item.line}")
                        done, keep_bytes, start = done + 1, keep_bytes + len(row[0]), index
            counts.append(lines)
        if matching and next(written, None) is not None:
            raise _not_this_input(output, done, "the input has no more rows")
    if errors:
        more = f"\n... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise ValueError("invalid input rows:\n" + "\n".join(errors[:10]) + more)
    if has_rows and keep_bytes != output.stat().st_size:
        with open(output, "r+b") as f:
            f.truncate(keep_bytes)
    if not has_rows:
        check_or_store(output, settings, has_rows=False)
    return JobStart(start, done, total, counts)


def _not_this_input(output: Path, done: int, where: str) -> ValueError:
    return ValueError(
        f"{output} row {done + 1} does not match the input row ({where}); it belongs to "
        "another job (pass --overwrite, or choose another --output)")


def prepare_output(output: Path, settings: dict, files: list[Path], num_reward_models: int,
                   overwrite: bool = False) -> tuple[int, int]:
    """prepare_job's (position, rows done)."""
    job = prepare_job(output, settings, files, num_reward_models, overwrite=overwrite)
    return job.start, job.done


def engine_settings(llm, sampling_params) -> dict:
    """The fingerprint of a job on a GuidedLLM: from the settings it was made with, as the
    CLI computes it before starting the engine, so a job the CLI began resumes from Python
    and back (dtype "auto" stays "auto", on a GPU as on a CPU)."""
    from genarm_vllm.jobs.fingerprint import job_settings

    return job_settings(llm.base, llm.reward_models, llm.beta, llm.weights, sampling_params,
                        llm.engine_kwargs, getattr(llm, "own_chat_templates", None))


# ----------------------------------------------------------------------------- the job


def run_job(
    llm,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    sampling_params,
    *,
    settings: dict | None = None,
    on_error: str = "continue",
    overwrite: bool = False,
    reorder_buffer: int = REORDER_BUFFER,
    max_in_flight: int | None = None,
    progress: bool = True,
    prepared: JobStart | None = None,
):
    """Generate for every input row not yet in `output_path`; returns a JobSummary.

    settings: the job's fingerprint (fingerprint.job_settings); None: read off `llm`.
    max_in_flight: requests kept in the engine (None: twice its max_num_seqs).
    prepared: prepare_job's result for this output and input when the caller has it
        already (the CLI, before starting the engine): the input is then not read again
        before the first row (settings and overwrite are then the caller's business).
    """
    from genarm_vllm.jobs.feeding import EngineFeeder, refusal_types
    from genarm_vllm.jobs.progress import JobProgress
    from genarm_vllm.jobs.reorder import OrderedWriter

    check_on_error(on_error)
    output, files = Path(output_path), input_files(input_path)
    num_reward_models = len(llm.reward_models)
    if prepared is None:
        if settings is None:
            settings = engine_settings(llm, sampling_params)
        prepared = prepare_job(output, settings, files, num_reward_models, overwrite=overwrite)
    start = prepared.start
    feeder = EngineFeeder(llm, sampling_params, max_in_flight)
    builder = PromptBuilder(llm)
    bar = JobProgress(prepared.total, prepared.done, progress)
    stop: str | None = None  # on_error="fail": the first bad row, raised once earlier rows are out
    try:
        with OrderedWriter(output, start, reorder_buffer) as writer:

            def submit(item: InputLine) -> str | None:
                parsed = parse_line(item, num_reward_models)
                if parsed is None:
                    writer.put(item.index, None)
                    return None
                error = parsed.error
                if error is None:
                    try:
                        prompt, guidance = builder.request(parsed.row)
                        try:
                            feeder.add((item.index, parsed.row), prompt, guidance)
                        except refusal_types() as e:
                            raise RowError("refused by the engine", str(e)) from None
                    except RowError as e:
                        error = e
                if error is None:
                    return None
                message = located(item, error)
                if on_error == "fail":
                    return message
                writer.put(item.index, error_line(parsed.fields, message))
                bar.failed(error.kind, message)
                return None

            lines = read_lines(files, start)
            waiting = next(lines, None)
            while (waiting is not None and stop is None) or feeder.in_flight:
                if feeder.wants_rows():  # top up in a bunch (see EngineFeeder.wants_rows)
                    while (waiting is not None and stop is None and feeder.has_room()
                           and writer.has_room(waiting.index)):
                        stop = submit(waiting)
                        waiting = next(lines, None)
                # Window full means its first row is still in the engine: never a dead end.
                for (index, row), result in feeder.step() if feeder.in_flight else ():
                    line, tokens = output_line(row, result)
                    writer.put(index, line)
                    bar.done(tokens=tokens)
            bar.summary.peak_buffered = writer.peak_pending
    finally:
        feeder.abort()
        summary = bar.close()
    if stop is not None:
        raise ValueError(f"stopped at a bad row (--on-error fail; {summary.rows_written} rows "
                         f"written before it): {stop}")
    return summary
