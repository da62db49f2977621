"""`genarm-vllm score`: reward-model scores for generated rows (JSONL in, JSONL out).

Scorers:
- a sequence-level reward model (a `*ForSequenceClassification` checkpoint with one
  label, e.g. a Llama reward model) runs on vLLM's pooling runner:
  `vllm.LLM(path, runner="pooling").classify(token ids, PoolingParams(use_activation=False))`,
  the raw logit of the last token (no sigmoid). What it reads: the row's chat (its
  "messages", or its "prompt" as one user message) plus the response as the assistant's
  message, rendered by the SCORER's own chat template when its tokenizer has one; else
  the prompt text followed by the response text (tokenized with the scorer's special
  tokens); or a format string of the user's (`template`, with {prompt} and {response}).
- the GenARM ARM itself: its sequence reward beta_r * sum_t log pi_ARM(y_t | x, y_<t)
  over the response's tokens (the reward the ARM was trained on), from vLLM prompt
  logprobs (`SamplingParams(prompt_logprobs=0, max_tokens=1)`) over the prompt's ids
  (tokenization.prompt_ids) and the response's ids: the row's "generated_token_ids" when
  it has them (the tokens the base generated, EOS included when it stopped there), else
  tokenization.response_ids of "generated_text" (response, then EOS, as in training).

Each scorer has a name and a sign: +1 when higher is better, -1 for a cost model (lower is
better); the scores are stored as the models give them, in the row's "scores" object
({name: value}, added to any scores the row already has), and the signs in the output's
settings file, where `genarm-vllm report` reads them.

Rows: a row that already carries "error" (a failed generation) is passed on unchanged; a
line that is not a JSON object, or a row without "generated_text" or without one of
"prompt" / "messages", becomes an error row (its fields plus "error", naming the file and
line); a row one scorer cannot score (too long for it, a token id it cannot embed, no chat
template for a chat) keeps the other scorers' scores and gets an "error" naming the scorer.
The job goes on in every case.

Running: one scorer at a time, over the whole input, each writing its scores in input
order to a part file (`OUTPUT.parts/NAME.jsonl`, flushed per chunk); then the parts and
the input are merged into the output (written whole, then renamed into place). With more
than one scorer, each runs in its own subprocess, so that only one model is in memory at a
time (in-process vLLM engines cannot be freed). Resume: a re-run keeps the complete
lines of every part and continues after them; the settings (the scorers, their files,
signs, templates, beta_r, and dtype) are fingerprinted in `OUTPUT.settings.json` as for
the batch job, and a re-run with others refuses to go on.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from genarm_vllm.jobs.batch import (
    RAW_LINE_FIELD,
    InputLine,
    count_rows,
    input_files,
    located,
    read_lines,
)

KINDS = ("classifier", "arm")
SCORES_FIELD = "scores"
PARTS_SUFFIX = ".parts"
CHUNK_ROWS = 256  # rows per vLLM call (and per flush of a part file)


@dataclass(frozen=True)
class Scorer:
    name: str
    path: str
    sign: float = 1.0
    kind: str = "classifier"      # "classifier" (vLLM pooling) or "arm" (prompt logprobs)
    beta_r: float = 1.0           # arm only: the reward's scale
    template: str | None = None   # classifier only: "... {prompt} ... {response}"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"scorer {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"a scorer name must be a plain word, got {self.name!r}")
        if self.sign not in (1.0, -1.0):
            raise ValueError(f"scorer {self.name!r}: sign must be 1 or -1, got {self.sign!r}")
        if not math.isfinite(self.beta_r) or self.beta_r <= 0:
            raise ValueError(f"scorer {self.name!r}: beta_r must be > 0, got {self.beta_r!r}")
        if self.template is not None and self.kind != "classifier":
            raise ValueError(f"scorer {self.name!r}: a template applies to reward models only")


def _sign(text: str, spec: str) -> float:
    value = {"+": 1.0, "+1": 1.0, "1": 1.0, "-": -1.0, "-1": -1.0}.get(text.strip())
    if value is None:
        raise ValueError(f"{spec!r}: the sign must be 1 or -1, got {text!r}")
    return value


def parse_scorer(spec: str, templates: dict | None = None) -> Scorer:
    """--scorer NAME=PATH[:SIGN] (SIGN 1 or -1; -1 for a cost model)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--scorer takes NAME=PATH[:SIGN], got {spec!r}")
    sign = 1.0
    head, colon, tail = path.rpartition(":")
    if colon and tail.strip() in ("1", "-1", "+1", "+", "-"):
        path, sign = head, _sign(tail, spec)
    return Scorer(name.strip(), path, sign, "classifier",
                  template=(templates or {}).get(name.strip()))


def parse_arm_scorer(spec: str) -> Scorer:
    """--arm-scorer NAME=PATH[,beta_r=B][,sign=S]."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--arm-scorer takes NAME=PATH[,beta_r=B][,sign=S], got {spec!r}")
    path, *options = rest.split(",")
    beta_r, sign = 1.0, 1.0
    for option in options:
        key, _, value = option.partition("=")
        key = key.strip()
        if key == "beta_r":
            try:
                beta_r = float(value)
            except ValueError:
                raise ValueError(f"{spec!r}: beta_r must be a number, got {value!r}") from None
        elif key == "sign":
            sign = _sign(value, spec)
        else:
            raise ValueError(f"{spec!r}: unknown option {key!r} (beta_r, sign)")
    return Scorer(name.strip(), path, sign, "arm", beta_r=beta_r)


def parse_templates(specs: Sequence[str] | None) -> dict:
    """--template NAME=FORMAT (repeat): {name: format}."""
    out = {}
    for spec in specs or ():
        name, sep, text = spec.partition("=")
        if not sep or "{response}" not in text:
            raise ValueError(f"--template takes NAME=FORMAT with {{prompt}} and {{response}}, "
                             f"got {spec!r}")
        out[name.strip()] = text.encode().decode("unicode_escape")  # "\n" written as \n
    return out


def check_scorers(scorers: Sequence[Scorer]) -> list[Scorer]:
    if not scorers:
        raise ValueError("give at least one --scorer or --arm-scorer")
    names = [s.name for s in scorers]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"scorer names must differ: {', '.join(twice)} given twice")
    for s in scorers:
        if not Path(s.path).is_dir():
            raise ValueError(f"scorer {s.name!r}: {s.path} is not a model folder")
    return list(scorers)


# ----------------------------------------------------------------------------- rows


class RowError(ValueError):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def parse_scored_row(item: InputLine) -> tuple[dict | None, RowError | None, bool]:
    """(row, error, passed_on): a line's row and why it cannot be scored; passed_on for a
    row that already is an error row (kept as it is). None, None, False: a blank line."""
    try:
        row = json.loads(item.text)
    except json.JSONDecodeError as e:
        return None, RowError("bad JSON", f"not valid JSON ({e})"), False
    if not isinstance(row, dict):
        return None, RowError("bad row", f"a row must be a JSON object, got {type(row).__name__}"), False
    if "error" in row:
        return row, None, True
    if isinstance(row.get("prompt"), str) == isinstance(row.get("messages"), list):
        return row, RowError("bad row", 'a row needs exactly one of "prompt" (a string) or '
                                        '"messages" (a list)'), False
    if not isinstance(row.get("generated_text"), str):
        return row, RowError("bad row", 'the row has no "generated_text" (score the output of '
                                        '`genarm-vllm generate` or `sweep`)'), False
    if SCORES_FIELD in row and not isinstance(row[SCORES_FIELD], dict):
        return row, RowError("bad row", f'"{SCORES_FIELD}" must be an object'), False
    return row, None, False


def classifier_ids(tokenizer, row: dict, template: str | None = None) -> list[int]:
    """The token ids a sequence-level reward model reads for a row (see the module doc)."""
    response = row["generated_text"]
    if template is not None:
        if "prompt" not in row:
            raise RowError("bad row", "a --template needs rows with a \"prompt\", not \"messages\"")
        return tokenizer(template.format(prompt=row["prompt"], response=response)).input_ids
    if tokenizer.chat_template:
        from genarm_vllm.tokenization import user_message

        messages = row.get("messages") or user_message(row["prompt"])
        chat = [*messages, {"role": "assistant", "content": response}]
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    if "prompt" not in row:
        raise RowError("no chat template", "the row holds chat messages, and the scorer's "
                                           "tokenizer has no chat template (give --template)")
    return tokenizer(row["prompt"] + response).input_ids


def arm_ids(tokenizer, row: dict) -> tuple[list[int], int]:
    """(prompt ids + response ids, the number of prompt ids) of a row, for an ARM scorer."""
    from genarm_vllm.tokenization import prompt_ids, response_ids

    try:
        ids = prompt_ids(tokenizer, row.get("prompt"), row.get("messages"))
    except ValueError as e:
        raise RowError("no chat template", str(e)) from None
    generated = row.get("generated_token_ids")
    if isinstance(generated, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in generated):
        response = list(generated)
    else:
        response = response_ids(tokenizer, row["generated_text"])
    return ids + response, len(ids)


# ----------------------------------------------------------------------------- one scorer


def default_engine_kwargs(user: dict | None = None) -> dict:
    """vLLM kwargs of a scorer's engine: GenARM's CPU defaults (float32, KV cache share)."""
    from genarm_vllm.engine.defaults import engine_defaults

    user = dict(user or {})
    defaults = engine_defaults(None, [], user)
    defaults.pop("logprobs_mode", None)
    return {**defaults, **user}


def make_engine(scorer: Scorer, engine_kwargs: dict | None = None):
    """The vLLM engine of one scorer: the pooling runner for a reward model, the generate
    runner for an ARM."""
    from vllm import LLM

    kwargs = default_engine_kwargs(engine_kwargs)
    if scorer.kind == "classifier":
        kwargs.setdefault("runner", "pooling")
    return LLM(model=str(scorer.path), **kwargs)


class _Engine:
    """A scorer's engine and the checks a row's ids go through."""

    def __init__(self, llm, scorer: Scorer):
        self.llm, self.scorer = llm, scorer
        self.tokenizer = llm.get_tokenizer()
        config = llm.llm_engine.model_config
        self.max_model_len = config.max_model_len
        self.vocab_size = config.get_vocab_size()
        labels = getattr(config.hf_config, "num_labels", 1)
        if scorer.kind == "classifier" and labels != 1:
            raise ValueError(f"scorer {scorer.name!r}: {scorer.path} has {labels} labels; a "
                             "reward model has one (its score is that label's logit)")

    def ids(self, row: dict) -> tuple[list[int], int]:
        if self.scorer.kind == "arm":
            ids, start = arm_ids(self.tokenizer, row)
            limit = self.max_model_len - 1  # one token is generated (and dropped)
        else:
            ids, start = classifier_ids(self.tokenizer, row, self.scorer.template), 0
            limit = self.max_model_len
        if not ids:
            raise RowError("bad row", "nothing to score (no tokens)")
        if len(ids) > limit:
            raise RowError("too long", f"{len(ids)} tokens, more than scorer "
                                       f"{self.scorer.name!r} takes (max_model_len "
                                       f"{self.max_model_len})")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RowError("id a model cannot embed", f"token id {bad} is beyond scorer "
                                                      f"{self.scorer.name!r}'s vocabulary "
                                                      f"({self.vocab_size})")
        return ids, start

    def score(self, batch: list[tuple[list[int], int]]) -> list[float]:
        prompts = [{"prompt_token_ids": ids} for ids, _ in batch]
        if self.scorer.kind == "classifier":
            from vllm import PoolingParams

            outputs = self.llm.classify(prompts, pooling_params=PoolingParams(use_activation=False),
                                        use_tqdm=False)
            return [float(o.outputs.probs[0]) for o in outputs]
        from vllm import SamplingParams

        params = SamplingParams(prompt_logprobs=0, max_tokens=1, temperature=0)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        scores = []
        for (ids, start), output in zip(batch, outputs):
            # prompt_logprobs[i]: {token id: Logprob} of position i given ids[:i]; the
            # sampled token itself is always among them.
            logprobs = output.prompt_logprobs
            total = sum(logprobs[i][ids[i]].logprob for i in range(start, len(ids)))
            scores.append(self.scorer.beta_r * float(total))
        return scores


def part_path(output: str | os.PathLike, name: str) -> Path:
    output = Path(output)
    return output.with_name(output.name + PARTS_SUFFIX) / f"{name}.jsonl"


def line_hash(text: str) -> int:
    """A part line's check that it belongs to its input line (a resume with another input)."""
    import zlib

    return zlib.crc32(text.encode("utf-8"))


def complete_lines(path: Path) -> int:
    """Complete lines of a part file, dropping a torn last one."""
    if not path.exists():
        return 0
    keep, count = 0, 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            keep, count = keep + len(raw), count + 1
    if keep != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(keep)
    return count


def _rows(files: list[Path], skip: int) -> Iterator[tuple[InputLine, dict | None, RowError | None, bool]]:
    """The input's non-blank lines after the first `skip`, parsed."""
    seen = 0
    for item in read_lines(files):
        if not item.text.strip():
            continue
        seen += 1
        if seen <= skip:
            continue
        yield (item, *parse_scored_row(item))


def score_part(llm, scorer: Scorer, input_path, output_path, *, chunk_rows: int = CHUNK_ROWS,
               progress: bool = True) -> dict:
    """One scorer over every input row not yet in its part file; returns its totals.

    Part line per non-blank input line: {"score": x}, {"error": reason} or {} (a row the
    merge decides about: not a row, or an error row already), with "h", the input line's
    hash (line_hash)."""
    from tqdm import tqdm

    files = input_files(input_path)
    path = part_path(output_path, scorer.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = complete_lines(path)
    total = count_rows(files)
    engine = _Engine(llm, scorer)
    counts: Counter = Counter()
    start = time.monotonic()
    bar = tqdm(total=total, initial=done, unit="row", desc=f"score {scorer.name}",
               disable=not progress, dynamic_ncols=True)
    with open(path, "a", encoding="utf-8") as out:
        pending: list[tuple[dict | None, tuple | None, int]] = []  # (line, ids, hash) in order

        def flush():
            batch = [ids for _, ids, _ in pending if ids is not None]
            scores = iter(engine.score(batch) if batch else [])
            for line, ids, digest in pending:
                line = line if ids is None else {"score": next(scores)}
                out.write(json.dumps({**line, "h": digest}) + "\n")
            out.flush()
            bar.update(len(pending))
            counts["scored"] += len(batch)
            pending.clear()

        for item, row, error, passed_on in _rows(files, done):
            digest = line_hash(item.text)
            if error is not None or passed_on:
                pending.append(({}, None, digest))
            else:
                try:
                    pending.append((None, engine.ids(row), digest))
                except RowError as e:
                    counts[e.kind] += 1
                    pending.append(({"error": str(e), "kind": e.kind}, None, digest))
            if len(pending) >= chunk_rows:
                flush()
        flush()
    bar.close()
    return {"scorer": scorer.name, "rows_before": done, "seconds": time.monotonic() - start,
            **counts}


def _score_part_in_subprocess(scorer: Scorer, input_path, output_path, engine_kwargs,
                              chunk_rows: int, progress: bool) -> dict:
    """score_part in a spawned process: its engine is freed when the process exits. (Not a
    multiprocessing.Pool: its workers are daemons, and vLLM's engine core starts a process
    of its own.)"""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(
        target=_subprocess_part, name=f"genarm-score-{scorer.name}",
        args=(asdict(scorer), str(input_path), str(output_path), engine_kwargs, chunk_rows,
              progress, send))
    process.start()
    send.close()
    try:
        status, value = receive.recv()
    except EOFError:
        status, value = "died", None
    # Its part file is complete and closed once it has answered; a process whose vLLM
    # engine (core in a process of its own) does not wind down is ended.
    process.join(timeout=30)
    if process.is_alive():
        process.terminate()
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()
    if status == "ok":
        return value
    if status == "user":
        raise ValueError(value)
    if status == "died":
        raise RuntimeError(f"scorer {scorer.name!r}: its process exited with code "
                           f"{process.exitcode} (out of memory?); run again to resume")
    raise RuntimeError(f"scorer {scorer.name!r} failed in its process:\n{value}")


def _subprocess_part(scorer: dict, input_path, output_path, engine_kwargs, chunk_rows, progress,
                     send):
    import traceback

    try:
        scorer = Scorer(**scorer)
        llm = make_engine(scorer, engine_kwargs)
        totals = score_part(llm, scorer, input_path, output_path, chunk_rows=chunk_rows,
                            progress=progress)
        send.send(("ok", totals))
        shutdown = getattr(getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:  # the engine core's own process, if it has one
            shutdown()
    except ValueError as e:
        send.send(("user", str(e)))
    except BaseException:
        send.send(("error", traceback.format_exc()))
    finally:
        send.close()


# ----------------------------------------------------------------------------- the job


@dataclass
class ScoreSummary:
    rows_scored: int = 0            # rows with every score
    rows_failed: int = 0            # error rows written by this job (or with a scorer's error)
    rows_passed_on: int = 0         # rows that were error rows already
    seconds: float = 0.0
    scorers: list[dict] = field(default_factory=list)
    failures: Counter = field(default_factory=Counter)
    first_failures: list[str] = field(default_factory=list)

    def report(self) -> str:
        failed = ""
        if self.rows_failed:
            failed = " (" + ", ".join(f"{n} {k}" for k, n in self.failures.most_common()) + ")"
        lines = [f"{self.rows_scored} rows scored, {self.rows_failed} failed{failed}, "
                 f"{self.rows_passed_on} error rows passed on, in {self.seconds:.1f} s"]
        for s in self.scorers:
            lines.append(f"  {s['scorer']}: {s.get('scored', 0)} rows in {s['seconds']:.1f} s"
                         + (f" ({s['rows_before']} already scored)" if s["rows_before"] else ""))
        if self.first_failures:
            lines += ["failed rows:", *("  " + f for f in self.first_failures)]
        return "\n".join(lines)


def score_settings(scorers: Sequence[Scorer], engine_kwargs: dict | None) -> dict:
    from genarm_vllm.jobs.fingerprint import model_identity

    engine = default_engine_kwargs(engine_kwargs)
    return {
        "scorers": [{**asdict(s), "model": model_identity(s.path)} for s in scorers],
        "engine.dtype": str(engine.get("dtype", "auto")).removeprefix("torch."),
        "engine.quantization": engine.get("quantization"),
    }


def read_signs(scored_path: str | os.PathLike) -> dict[str, float]:
    """{score name: sign} from a scored file's settings (empty when there are none)."""
    from genarm_vllm.jobs.fingerprint import settings_path

    path = settings_path(scored_path)
    if not path.is_file():
        return {}
    stored = json.loads(path.read_text())
    return {s["name"]: float(s["sign"]) for s in stored.get("scorers", [])}


def score_job(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    scorers: Sequence[Scorer],
    *,
    engine_kwargs: dict | None = None,
    engines: dict | None = None,
    isolate: bool | None = None,
    overwrite: bool = False,
    chunk_rows: int = CHUNK_ROWS,
    progress: bool = True,
) -> ScoreSummary:
    """Score every row of `input_path` with every scorer into `output_path`.

    engines: {scorer name: a vLLM LLM already built for it} (used in this process);
    isolate: run each other scorer's engine in a subprocess (None: when there are several).
    """
    from genarm_vllm.jobs.fingerprint import check_or_store, settings_path

    scorers = check_scorers(scorers)
    engines = engines or {}
    output, files = Path(output_path), input_files(input_path)
    parts = output.with_name(output.name + PARTS_SUFFIX)
    if overwrite:
        output.unlink(missing_ok=True)
        settings_path(output).unlink(missing_ok=True)
        shutil.rmtree(parts, ignore_errors=True)
    settings = score_settings(scorers, engine_kwargs)
    has_rows = (output.exists() and output.stat().st_size > 0) or (
        parts.is_dir() and any(p.stat().st_size for p in parts.iterdir()))
    check_or_store(output, settings, has_rows)
    summary = ScoreSummary()
    start = time.monotonic()
    if output.exists() and not parts.exists():
        summary.seconds = time.monotonic() - start
        return summary  # finished before: the output is only ever written whole
    total = count_rows(files)
    if isolate is None:
        isolate = len([s for s in scorers if s.name not in engines]) > 1
    for scorer in scorers:
        if complete_lines(part_path(output, scorer.name)) >= total:
            continue
        if scorer.name in engines:
            totals = score_part(engines[scorer.name], scorer, input_path, output,
                                chunk_rows=chunk_rows, progress=progress)
        elif isolate:
            totals = _score_part_in_subprocess(scorer, input_path, output, engine_kwargs,
                                               chunk_rows, progress)
        else:
            totals = score_part(make_engine(scorer, engine_kwargs), scorer, input_path, output,
                                chunk_rows=chunk_rows, progress=progress)
        summary.scorers.append(totals)
    merge(files, output, scorers, summary)
    shutil.rmtree(parts, ignore_errors=True)
    summary.seconds = time.monotonic() - start
    return summary


def merge(files: list[Path], output: Path, scorers: Sequence[Scorer], summary: ScoreSummary) -> None:
    """Input rows + every scorer's part, streamed, into `output` (replaced atomically)."""
    from genarm_vllm.jobs.progress import MAX_LISTED_FAILURES

    part_files = [open(part_path(output, s.name), encoding="utf-8") for s in scorers]
    tmp = output.with_name(output.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for item, row, error, passed_on in _rows(files, 0):
                parts = [json.loads(next(f)) for f in part_files]
                for scorer, part in zip(scorers, parts):
                    if part.get("h") != line_hash(item.text):
                        raise ValueError(
                            f"{part_path(output, scorer.name)} does not match the input at "
                            f"{item.file} line {item.line}: it was scored from another input "
                            "(pass --overwrite, or choose another --output)")
                if passed_on:
                    summary.rows_passed_on += 1
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    continue
                problems = []
                if error is None:
                    scores = dict(row.get(SCORES_FIELD) or {})
                    for scorer, part in zip(scorers, parts):
                        if "score" in part:
                            scores[scorer.name] = part["score"]
                        else:
                            problems.append((part.get("kind", "error"),
                                             f"scorer {scorer.name!r}: {part['error']}"))
                    row = {**row, SCORES_FIELD: scores}
                else:
                    problems.append((error.kind, str(error)))
                    if row is None:
                        row = {RAW_LINE_FIELD: item.text}
                if problems:
                    message = located(item, "; ".join(p for _, p in problems))
                    row = {**row, "error": message}
                    summary.rows_failed += 1
                    summary.failures[problems[0][0]] += 1
                    if len(summary.first_failures) < MAX_LISTED_FAILURES:
                        summary.first_failures.append(message)
                else:
                    summary.rows_scored += 1
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, output)
    finally:
        for f in part_files:
            f.close()
        tmp.unlink(missing_ok=True)
