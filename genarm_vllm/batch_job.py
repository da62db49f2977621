"""The JSONL batch job behind `genarm-vllm generate`.

Input rows: {"prompt": str} or {"messages": [...]} (rendered with the base tokenizer's
chat template), plus optional per-row "beta" and "weights". The input is one JSONL file,
or shards: a folder of *.jsonl files or a glob, read in sorted file name order. Output
rows: every input field plus "generated_text", "generated_token_ids" and
"finish_reason", in input order, in one JSONL file.

The output is written chunk by chunk and flushed, so a re-run after an interruption
keeps the complete rows already there and continues after them (a torn last line is
dropped and redone); no row is written twice.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

from genarm_vllm.guidance import row_guidance
from genarm_vllm.tokenization import prompt_ids

OUTPUT_FIELDS = ("generated_text", "generated_token_ids", "finish_reason")


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


def read_rows(path: str | os.PathLike, num_reward_models: int) -> list[dict]:
    """All input rows (of every shard, in file name order), validated; ValueError naming
    every bad line (up to 10)."""
    rows, errors = [], []
    for file in input_files(path):
        with open(file, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    check_row(row, num_reward_models)
                except json.JSONDecodeError as e:
                    errors.append(f"{file} line {line_number}: not valid JSON ({e})")
                    continue
                except ValueError as e:
                    errors.append(f"{file} line {line_number}: {e}")
                    continue
                rows.append(row)
    if errors:
        more = f"\n... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise ValueError("invalid input rows:\n" + "\n".join(errors[:10]) + more)
    return rows


def check_row(row: object, num_reward_models: int) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    if isinstance(row.get("prompt"), str) == isinstance(row.get("messages"), list):
        raise ValueError('a row needs exactly one of "prompt" (a string) or "messages" (a list)')
    row_guidance(row, num_reward_models)


def completed_rows(output: Path, rows: list[dict]) -> int:
    """How many rows `output` already holds; drops a torn last line."""
    if not output.exists():
        return 0
    done, keep_bytes = 0, 0
    with open(output, "rb") as f:
        for raw in f:
            try:
                written = json.loads(raw)
            except json.JSONDecodeError:
                break
            if not raw.endswith(b"\n"):
                break
            if done >= len(rows) or _input_part(written) != rows[done]:
                raise ValueError(
                    f"{output} row {done + 1} does not match the input row; it belongs to "
                    "another job (remove it or choose another --output)"
                )
            done, keep_bytes = done + 1, keep_bytes + len(raw)
    if keep_bytes != output.stat().st_size:
        with open(output, "r+b") as f:
            f.truncate(keep_bytes)
    return done


def _input_part(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in OUTPUT_FIELDS}


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_job(
    llm,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    sampling_params,
    rows: list[dict] | None = None,
    chunk_size: int = 512,
    progress: bool = True,
) -> int:
    """Generate for every row not yet in `output_path`; returns how many rows it added."""
    from tqdm import tqdm

    output = Path(output_path)
    if rows is None:
        rows = read_rows(input_path, len(llm.reward_models))
    done = completed_rows(output, rows)
    todo = rows[done:]
    tokenizer = llm.get_tokenizer()
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "a", encoding="utf-8") as out, tqdm(
        total=len(rows), initial=done, unit="row", desc="generate", disable=not progress
    ) as bar:
        for chunk in chunks(todo, chunk_size):
            out.writelines(generate_lines(llm, chunk, sampling_params, tokenizer))
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(chunk))
    return len(todo)


def generate_lines(llm, rows: list[dict], sampling_params, tokenizer) -> list[str]:
    """One engine call for `rows`: their output JSONL lines, in row order.

    Shared by this job and the Ray job (genarm_vllm.ray_job), so both write the same rows.
    """
    prompts = [
        {"prompt_token_ids": prompt_ids(tokenizer, row.get("prompt"), row.get("messages"))}
        for row in rows
    ]
    guidance = [row_guidance(row, len(llm.reward_models)) for row in rows]
    results = llm.generate(prompts, sampling_params, guidance=guidance, use_tqdm=False)
    lines = []
    for row, result in zip(rows, results):
        completion = result.outputs[0]
        output_row = {
            **row,
            "generated_text": completion.text,
            "generated_token_ids": list(completion.token_ids),
            "finish_reason": completion.finish_reason,
        }
        lines.append(json.dumps(output_row, ensure_ascii=False) + "\n")
    return lines

