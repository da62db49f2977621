"""Preference data: rows in the common public layouts -> tokenized Pairs -> padded batches.

Tokenization (genarm_vllm.tokenization, the contract shared with the decoders):
    prompt ids   a plain prompt: tokenized with the tokenizer's special tokens (as vLLM's
                 generate() does); with chat_template=True, or for rows that are chat
                 conversations, the chat template for the prompt turns (generation prompt
                 added), as vLLM's chat path does;
    response ids the response tokenized on its own, then EOS.
Only response tokens (EOS included) are scored; prompt and padding positions are masked. A
response that does not fit in max_length after its prompt is cut (its EOS is then dropped).

Rows (JSONL lines or a `datasets` folder):
    {"prompt": str, "chosen": str, "rejected": str}
    {"chosen": [messages], "rejected": [messages]} (UltraFeedback binarized; "prompt", a string
        or a list of messages, optional): the turns before the last assistant message must be
        the same in both and are the prompt; the last assistant contents are the responses;
    {"chosen": "\\n\\nHuman: ... \\n\\nAssistant: ...", "rejected": ...} (HH-RLHF): the text up
        to the last "\\n\\nAssistant:" is the shared prompt, the rest the responses.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

FIELDS = ("prompt", "chosen", "rejected")
MAX_REPORTED_ROWS = 10
IGNORE = -100  # label of positions that are not scored (prompt, padding)
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


@dataclasses.dataclass
class Pair:
    """One tokenized preference pair (responses end with EOS unless cut by max_length)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False


def read_rows(data: str | Path) -> tuple[list[tuple[str, object]], list[str]]:
    """([(where, row)], [errors]) from a JSONL file or a local `datasets` folder.

    `where` names the row in messages: "line N" (1-based JSONL line) or "row N" (1-based).
    """
    path = Path(data)
    if not path.exists():
        raise ValueError(f"data {data} does not exist")
    if path.is_dir():
        return read_dataset_folder(path), []
    rows, errors = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                errors.append(f"line {number}: not valid JSON ({e.msg})")
    return rows, errors


def read_dataset_folder(path: Path) -> list[tuple[str, object]]:
    """Rows of a Hugging Face `datasets` folder (save_to_disk); of a DatasetDict, the split
    train (or train_prefs, as UltraFeedback binarized names it), or its only split."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ValueError(f"{path} is not a datasets folder (save_to_disk) or a JSONL file: {e}") from None
    if isinstance(dataset, datasets.DatasetDict):
        split = next((s for s in ("train", "train_prefs") if s in dataset), None)
        if split is None and len(dataset) != 1:
            raise ValueError(f"{path} holds splits {list(dataset)}; expected 'train', "
                             "'train_prefs' or one split")
        dataset = dataset[split] if split else next(iter(dataset.values()))
    missing = [name for name in ("chosen", "rejected") if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"dataset {path} lacks column(s) {', '.join(missing)} (has {dataset.column_names})"
        )
    columns = [name for name in FIELDS if name in dataset.column_names]
    return [(f"row {i}", row) for i, row in enumerate(dataset.select_columns(columns), start=1)]


ROW_LAYOUTS = ('rows must be {"prompt", "chosen", "rejected"} strings; or "chosen" / "rejected" '
               'chat message lists ending in an assistant turn after the same prompt turns '
               '(UltraFeedback style); or "chosen" / "rejected" HH-RLHF conversations '
               '("\\n\\nHuman: ... \\n\\nAssistant: ...") sharing all but the last answer')


def hh_split(text: str) -> tuple[str, str] | None:
    """(prompt up to and including the last "\\n\\nAssistant:", the answer) of an HH-RLHF
    conversation; None if `text` is not one."""
    end = text.rfind(HH_ASSISTANT)
    if end < 0 or HH_HUMAN not in text[:end + 1]:
        return None
    end += len(HH_ASSISTANT)
    return text[:end], text[end:]


def hh_messages(prompt: str) -> list[dict]:
    """The turns of an HH-RLHF prompt (without its final, empty "Assistant:") as chat messages."""
    parts = re.split(r"\n\n(Human|Assistant):", prompt)
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant",
                         "content": content.strip()})
    return messages[:-1]  # the last is the generation prompt: "\n\nAssistant:" with no text


def is_chat(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value)


def parse_row(row: object, chat_template: bool) -> tuple[dict, str, str]:
    """(prompt_ids kwargs {prompt=...} or {messages=...}, chosen, rejected) of one data row, in
    any of the layouts the module docstring lists; ValueError says what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}; {ROW_LAYOUTS}")
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    missing = [name for name in ("chosen", "rejected") if row.get(name) is None]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    if isinstance(chosen, list) or isinstance(rejected, list):  # chat conversations
        for name, value in [("chosen", chosen), ("rejected", rejected)]:
            if not is_chat(value) or not value or value[-1]["role"] != "assistant":
                raise ValueError(f"{name!r} is not a list of chat messages ({{role, content}} "
                                 f"strings) ending in an assistant turn; {ROW_LAYOUTS}")
        if chosen[:-1] != rejected[:-1]:
            raise ValueError("'chosen' and 'rejected' conversations differ before their last "
                             "assistant turn (they must share the prompt turns)")
        context = chosen[:-1]
        if is_chat(prompt) and prompt:
            context = list(prompt) + context  # TRL's layout: prompt turns apart
        elif not context:
            if not isinstance(prompt, str):
                raise ValueError("the conversations hold only the answer and there is no "
                                 "'prompt' string or message list")
            context = [{"role": "user", "content": prompt}]
        messages = [{"role": m["role"], "content": m["content"]} for m in context]
        return {"messages": messages}, chosen[-1]["content"], rejected[-1]["content"]
    for name, value in [("chosen", chosen), ("rejected", rejected)]:
        if not isinstance(value, str):
            raise ValueError(f"{name!r} must be a string, got {type(value).__name__}")
    if prompt is None:  # HH-RLHF: the prompt is inside both conversations
        split_c, split_r = hh_split(chosen), hh_split(rejected)
        if split_c is None or split_r is None:
            raise ValueError(f"missing field(s) prompt; {ROW_LAYOUTS}")
        if split_c[0] != split_r[0]:
            raise ValueError("'chosen' and 'rejected' HH-RLHF conversations differ before the "
                             "last \"\\n\\nAssistant:\" (they must share the prompt)")
        prompt, chosen, rejected = split_c[0], split_c[1], split_r[1]
        if chat_template:
            return {"messages": hh_messages(prompt)}, chosen.lstrip(), rejected.lstrip()
        return {"prompt": prompt}, chosen, rejected
    if is_chat(prompt) and prompt:
        return {"messages": list(prompt)}, chosen, rejected
    if not isinstance(prompt, str):
        raise ValueError(f"'prompt' must be a string or chat messages, got {type(prompt).__name__}")
    from genarm_vllm.tokenization import user_message

    return ({"messages": user_message(prompt)} if chat_template else {"prompt": prompt}), chosen, rejected


def encode_pair(row: object, tokenizer, max_length: int, chat_template: bool) -> Pair:
    """A checked, tokenized Pair from one data row; ValueError says what is wrong with it."""
    from genarm_vllm.tokenization import prompt_ids, response_ids

    prompt, chosen, rejected = parse_row(row, chat_template)
    for name, text in [("chosen", chosen), ("rejected", rejected)]:
        if not text.strip():
            raise ValueError(f"{name!r} response is empty")
    ids = prompt_ids(tokenizer, **prompt)
    if not ids:
        raise ValueError("the prompt gives no tokens (and the tokenizer adds no BOS token), so "
                         "the first response token has no context")
    if len(ids) >= max_length:
        raise ValueError(f"the prompt is {len(ids)} tokens: max_length {max_length} "
                         "leaves no room for a response")
    room = max_length - len(ids)
    chosen_ids, rejected_ids = response_ids(tokenizer, chosen), response_ids(tokenizer, rejected)
    return Pair(ids, chosen_ids[:room], rejected_ids[:room],
                truncated=max(len(chosen_ids), len(rejected_ids)) > room)


def load_pairs(data: str | Path, tokenizer, max_length: int, chat_template: bool) -> list[Pair]:
    """Every row of `data` as a Pair; one ValueError listing the bad rows (up to 10) otherwise."""
    rows, errors = read_rows(data)
    pairs = []
    for where, row in rows:
        try:
            pairs.append(encode_pair(row, tokenizer, max_length, chat_template))
        except ValueError as e:
            errors.append(f"{where}: {e}")
    if errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ROWS])
        more = len(errors) - MAX_REPORTED_ROWS
        raise ValueError(
            f"{len(errors)} bad row(s) in {data} (rows need a prompt and non-empty chosen and "
            f"rejected responses):\n  {shown}" + (f"\n  ... and {more} more" if more > 0 else "")
        )
    if not pairs:
        raise ValueError(f"{data} holds no preference pairs")
    return pairs


def split_pairs(pairs: list[Pair], eval_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) after a seeded shuffle; at least one held-out pair if eval_fraction > 0."""
    pairs = list(pairs)
    random.Random(seed).shuffle(pairs)
    num_eval = round(len(pairs) * eval_fraction)
    if eval_fraction > 0:
        num_eval = max(num_eval, 1)
    if len(pairs) - num_eval < 1:
        raise ValueError(f"{len(pairs)} pair(s) leave no training pair after eval_fraction "
                         f"{eval_fraction}; give more data or a smaller eval_fraction")
    return pairs[num_eval:], pairs[:num_eval]



def collate(pairs: list[Pair], pad_id: int) -> dict:
    """Chosen then rejected sequences of `pairs` as one right-padded batch with labels."""
    import torch

    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs]
    sequences += [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(response) for prompt, response in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    for i, (prompt, response) in enumerate(sequences):
        end = len(prompt) + len(response)
        input_ids[i, :end] = torch.tensor(prompt + response)
        attention_mask[i, :end] = 1
        labels[i, len(prompt):end] = torch.tensor(response)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
