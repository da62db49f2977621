"""Inputs for the batch-job tests (single process and Ray): good rows and poison rows."""

import json
import os
import random
import signal
import time
from pathlib import Path

from genarm_vllm.testing import SMALL_ARM_SHAPE, WORDS, build_model, with_added_tokens

EXTRA_TOKEN = "<extra>"  # in the base's tokenizer only: the ARM cannot embed its id


def build_poison_models(tmp_path_factory, tiny) -> dict:
    """A base whose tokenizer has one added token at the end and an ARM without it.

    Built once per session at one place, so every test module's engine("poison", ...)
    (cached by key for the session) reads the same folders.
    """
    root = tmp_path_factory.getbasetemp() / "poison-models"
    if (root / "arm" / "config.json").exists():
        return {"base": root / "base_plus", "arm": root / "arm"}
    tok_plus = with_added_tokens(tiny["base"], root / "tok_plus", (EXTRA_TOKEN,))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny["base"]))
    return {
        "base": build_model(root / "base_plus", tok_plus, seed=1),
        "arm": build_model(root / "arm", tok, seed=3, **SMALL_ARM_SHAPE),
    }


def good_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = " ".join(rng.choices(WORDS, k=rng.randint(2, 8)))
        row = {"id": i, "prompt": text} if i % 6 else {
            "id": i, "messages": [{"role": "user", "content": text}]}
        if i % 5 == 1:
            row["beta"] = 0.5
        if i % 7 == 2:
            row["weights"] = [-0.5]
        rows.append(row)
    return rows


# Every kind of poison row: its JSONL text and the reason its error row must give.
POISON = [
    ("not json {", "not valid JSON"),
    ('[1, 2]', "a row must be a JSON object"),
    (json.dumps({"id": "p-noprompt", "text": "no prompt"}), 'exactly one of "prompt"'),
    (json.dumps({"id": "p-beta", "prompt": "a dog", "beta": -1}), "beta must be a finite number > 0"),
    (json.dumps({"id": "p-weights", "prompt": "a dog", "weights": [1, 2]}),
     "one entry per reward model"),
    (json.dumps({"id": "p-long", "prompt": " ".join(["cat"] * 300)}),
     "the prompt is 300 tokens, which leaves no room to generate within max_model_len=256"),
    (json.dumps({"id": "p-extra", "prompt": f"the cat {EXTRA_TOKEN} sat"}),
     "is beyond reward model"),
    (json.dumps({"id": "p-empty", "prompt": ""}), "prompt cannot be empty"),  # vLLM refuses it
    (json.dumps({"id": "p-reserved", "prompt": "a dog", "error": "mine"}),
     "the row holds 'error', a field the output writes itself"),
]


def write_poisoned(folder, good, shards=2, seed=1):
    """`good` rows with every POISON row spread among them, over `shards` files, with a
    blank line; returns (input folder, {(file name, line): expected reason})."""
    rng = random.Random(seed)
    lines = [json.dumps(r) for r in good]
    for text, reason in POISON:
        lines.insert(rng.randrange(1, len(lines)), "\0" + reason + "\0" + text)
    lines.insert(len(lines) // 3, "")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expected, per_shard = {}, -(-len(lines) // shards)
    for k in range(shards):
        part = lines[k * per_shard:(k + 1) * per_shard]
        name = f"part-{k:02d}.jsonl"
        with open(folder / name, "w") as f:
            for number, line in enumerate(part, start=1):
                if line.startswith("\0"):
                    _, reason, line = line.split("\0", 2)
                    expected[(name, number)] = reason
                f.write(line + "\n")
    return folder, expected


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


def check_poisoned_output(out_rows, good_out_rows, expected):
    """Good rows equal the all-good run row for row; each poison row is an error row with
    its file, line and reason."""
    errors = [r for r in out_rows if "error" in r]
    assert [r for r in out_rows if "error" not in r] == good_out_rows
    assert len(errors) == len(expected) == len(POISON)
    for row in errors:
        location, reason = row["error"].split(": ", 1)
        file, line = location.rsplit(" line ", 1)
        assert reason.find(expected[(Path(file).name, int(line))]) >= 0, (row, expected)
        assert "generated_text" not in row


def kill_when_lines(process, path, at_least, timeout=300):
    """SIGKILL `process` once `path` holds `at_least` complete lines; the count then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_bytes().count(b"\n") if path.exists() else 0
        if lines >= at_least:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return lines
        if process.poll() is not None:
            raise AssertionError("the job ended before the kill: " + process.stderr.read()[-2000:])
        time.sleep(0.01)
    process.kill()
    raise AssertionError("timed out waiting for output")
