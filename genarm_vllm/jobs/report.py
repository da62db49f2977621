"""`genarm-vllm report`: what a sweep's scored rows say, per guidance setting (no vLLM here).

Reads scored rows (the output of `genarm-vllm score` over a `sweep` output: fields
"setting", "scores", and "prompt_index" or "id" pairing the settings' answers to one
prompt) and writes, under one prefix:

- PREFIX.md / PREFIX.json: per setting, the number of rows and the mean of every score
  with its percentile-bootstrap 95 % interval; which settings lie on the Pareto front of
  two chosen scores; the win rate of each setting against a baseline setting under one
  scorer (wins + half the ties, over the prompts both answered, with a bootstrap
  interval);
- PREFIX.png: the settings' means of the two scores with their intervals, the Pareto
  front drawn through them, axes oriented so that better is up and to the right.

Signs: +1 when a score is better high, -1 when it is better low (a cost model). They come
from the scored file's settings (what `score` was told), unless given here.
Rows with an "error" are left out (and counted per setting).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

BOOTSTRAP_RESAMPLES = 2000


def bootstrap_mean(
    values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = 0.95,
    seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile-bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def interval(cell: dict, digits: int = 2) -> str:
    if cell["mean"] is None or (isinstance(cell["mean"], float) and math.isnan(cell["mean"])):
        return "-"
    return f"{cell['mean']:.{digits}f} [{cell['low']:.{digits}f}, {cell['high']:.{digits}f}]"


def _round(value: float, digits: int = 4):
    return None if value is None or math.isnan(value) else round(value, digits)


# ----------------------------------------------------------------------------- reading


def read_rows(paths: str | os.PathLike | Iterable) -> list[dict]:
    """Every row of one or more JSONL files (blank lines skipped)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def score_names(rows: Iterable[dict]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        for name in row.get("scores") or {}:
            names.setdefault(name)
    return list(names)


def setting_order(rows: Iterable[dict]) -> list[str]:
    """Settings in the order they first appear (a sweep's grid order)."""
    order: dict[str, None] = {}
    for row in rows:
        if "setting" in row:
            order.setdefault(str(row["setting"]))
    return list(order)


def pair_key(row: dict):
    """What pairs the answers of several settings to one prompt."""
    if "prompt_index" in row:
        return ("prompt_index", row["prompt_index"])
    if "id" in row:
        return ("id", json.dumps(row["id"], sort_keys=True))
    return ("prompt", json.dumps(row.get("prompt", row.get("messages")), sort_keys=True))


# ----------------------------------------------------------------------------- figures


def summarise(rows: Sequence[dict], scores: Sequence[str], *, seed: int = 0,
              resamples: int = BOOTSTRAP_RESAMPLES) -> list[dict]:
    """One entry per setting: its guidance, rows, failed rows, and each score's mean with a
    bootstrap 95 % interval (the same seed for every cell)."""
    table = []
    for name in setting_order(rows):
        mine = [r for r in rows if str(r.get("setting")) == name]
        ok = [r for r in mine if "error" not in r]
        first = mine[0]
        entry = {"setting": name, "beta": first.get("beta"), "weights": first.get("weights"),
                 "n": len(ok), "failed": len(mine) - len(ok)}
        for score in scores:
            values = [r["scores"][score] for r in ok if score in (r.get("scores") or {})]
            mean, low, high = bootstrap_mean(values, resamples=resamples, seed=seed)
            entry[score] = {"mean": _round(mean), "low": _round(low), "high": _round(high),
                            "n": len(values)}
        tokens = [len(r["generated_token_ids"]) for r in ok
                  if isinstance(r.get("generated_token_ids"), list)]
        if tokens:
            entry["mean_tokens"] = round(float(np.mean(tokens)), 2)
        table.append(entry)
    return table


def pareto_front(points: Sequence[tuple[float, float]], signs: tuple[float, float] = (1, 1)) -> list[bool]:
    """Which points no other point dominates, each coordinate better when sign * value is
    larger. A point is dominated by one at least as good on both coordinates and better on
    one; points with a NaN coordinate are never on the front; equal points are both on it."""
    sx, sy = signs
    oriented = [(sx * x, sy * y) for x, y in points]
    front = []
    for i, (x, y) in enumerate(oriented):
        if math.isnan(x) or math.isnan(y):
            front.append(False)
            continue
        dominated = any(
            j != i and not (math.isnan(a) or math.isnan(b)) and a >= x and b >= y and (a > x or b > y)
            for j, (a, b) in enumerate(oriented))
        front.append(not dominated)
    return front


def win_rates(rows: Sequence[dict], scorer: str, baseline: str, *, sign: float = 1.0,
              seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> list[dict]:
    """Each setting against `baseline` under `scorer`, over the prompts both scored: wins
    (sign * (score - baseline's) > 0), ties, losses, and the win rate (wins + ties / 2) / n
    with a bootstrap 95 % interval."""
    def scores_of(name):
        return {pair_key(r): r["scores"][scorer] for r in rows
                if str(r.get("setting")) == name and "error" not in r
                and scorer in (r.get("scores") or {})}

    base = scores_of(baseline)
    if not base:
        raise ValueError(f"no scored rows of the baseline setting {baseline!r} under {scorer!r}")
    result = []
    for name in setting_order(rows):
        if name == baseline:
            continue
        mine = scores_of(name)
        outcomes = []
        for key, value in mine.items():
            if key in base:
                diff = sign * (value - base[key])
                outcomes.append(1.0 if diff > 0 else 0.5 if diff == 0 else 0.0)
        rate, low, high = bootstrap_mean(outcomes, resamples=resamples, seed=seed)
        result.append({
            "setting": name, "baseline": baseline, "scorer": scorer, "n": len(outcomes),
            "wins": outcomes.count(1.0), "ties": outcomes.count(0.5),
            "losses": outcomes.count(0.0),
            "win_rate": {"mean": _round(rate), "low": _round(low), "high": _round(high)},
        })
    return result


# ----------------------------------------------------------------------------- output


def plot_pareto(table: list[dict], x: str, y: str, signs: tuple[float, float], front: list[bool],
                path: str | os.PathLike, title: str | None = None,
                labels: dict[str, str] | None = None) -> None:
    """The settings' means of scores x and y with their intervals, the front joined by a
    line; labels: {score: axis label} (default "mean SCORE (higher/lower is better)")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for entry, on_front in zip(table, front):
        cx, cy = entry[x], entry[y]
        if cx["mean"] is None or cy["mean"] is None:
            continue
        ax.errorbar([cx["mean"]], [cy["mean"]],
                    xerr=[[cx["mean"] - cx["low"]], [cx["high"] - cx["mean"]]],
                    yerr=[[cy["mean"] - cy["low"]], [cy["high"] - cy["mean"]]],
                    fmt="o" if on_front else "s", color="C0" if on_front else "gray", capsize=3)
        ax.annotate(entry["setting"], (cx["mean"], cy["mean"]), textcoords="offset points",
                    xytext=(6, 6), fontsize=8)
    points = sorted(((e[x]["mean"], e[y]["mean"]) for e, f in zip(table, front) if f),
                    key=lambda p: signs[0] * p[0])
    if len(points) > 1:
        ax.plot([p[0] for p in points], [p[1] for p in points], "-", color="C0", alpha=0.5,
                label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    better = {1.0: "higher is better", -1.0: "lower is better"}
    labels = labels or {}
    ax.set_xlabel(labels.get(x, f"mean {x} ({better[signs[0]]})"))
    ax.set_ylabel(labels.get(y, f"mean {y} ({better[signs[1]]})"))
    if signs[0] < 0:
        ax.invert_xaxis()  # better on both = up and to the right
    if signs[1] < 0:
        ax.invert_yaxis()
    ax.set_title(title or f"Guidance settings: {x} vs {y}, 95% bootstrap CI", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _format_weights(weights) -> str:
    return "-" if weights is None else ",".join(f"{w:g}" for w in weights)


def write_report(
    rows: Sequence[dict],
    prefix: str | os.PathLike,
    *,
    scores: Sequence[str] | None = None,
    pareto: tuple[str, str] | None = None,
    signs: dict[str, float] | None = None,
    baseline: str | None = None,
    win_scorer: str | None = None,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> str:
    """Write PREFIX.json, PREFIX.md and (with two scores) PREFIX.png; returns the text the
    CLI prints (plain tables).

    scores: the scores reported (None: every one the rows hold); pareto: the two scores of
    the front (None: the first two); signs: {score: +1 or -1} (missing: +1); baseline: the
    setting the win rates compare against (None: the first setting); win_scorer: the score
    deciding wins (None: the first score)."""
    rows = list(rows)
    scores = list(scores or score_names(rows))
    if not scores:
        raise ValueError("the rows hold no scores: run `genarm-vllm score` on them first")
    names = setting_order(rows)
    if not names:
        raise ValueError('the rows have no "setting" field: report on the output of '
                         "`genarm-vllm sweep` (scored)")
    signs = {name: float((signs or {}).get(name, 1.0)) for name in scores}
    for name, sign in signs.items():
        if sign not in (1.0, -1.0):
            raise ValueError(f"the sign of {name!r} must be 1 or -1, got {sign:g}")
    for name in [*(pareto or ()), *([win_scorer] if win_scorer else [])]:
        if name not in scores:
            raise ValueError(f"no score named {name!r}; the rows hold {', '.join(scores)}")
    if pareto is None and len(scores) >= 2:
        pareto = (scores[0], scores[1])
    baseline = baseline or names[0]
    if baseline not in names:
        raise ValueError(f"no setting named {baseline!r}; the settings are {', '.join(names)}")
    win_scorer = win_scorer or scores[0]

    table = summarise(rows, scores, seed=seed, resamples=resamples)
    front = None
    if pareto is not None:
        x, y = pareto
        front = pareto_front([(nan_if_none(e[x]["mean"]), nan_if_none(e[y]["mean"])) for e in table],
                             (signs[x], signs[y]))
        for entry, on_front in zip(table, front):
            entry["pareto"] = on_front
    wins = win_rates(rows, win_scorer, baseline, sign=signs[win_scorer], seed=seed,
                     resamples=resamples)

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prompts = len({pair_key(r) for r in rows if "setting" in r})
    summary = {
        "settings": len(table), "prompts": prompts, "scores": scores, "signs": signs,
        "bootstrap": {"resamples": resamples, "confidence": 0.95, "seed": seed},
        "pareto": list(pareto) if pareto else None, "baseline": baseline,
        "win_scorer": win_scorer, "table": table, "win_rates": wins,
    }
    Path(f"{prefix}.json").write_text(json.dumps(summary, indent=2) + "\n")

    better = {1.0: "higher is better", -1.0: "lower is better"}
    header = ["setting", "beta", "weights", "n", *(f"{s} [95% CI]" for s in scores)]
    if front is not None:
        header.append("Pareto")
    body = []
    for entry in table:
        line = [entry["setting"], "-" if entry["beta"] is None else f"{entry['beta']:g}",
                _format_weights(entry["weights"]),
                str(entry["n"]) + (f" (+{entry['failed']} failed)" if entry["failed"] else ""),
                *(interval(entry[s]) for s in scores)]
        if front is not None:
            line.append("yes" if entry["pareto"] else "")
        body.append(line)
    win_header = ["setting", f"vs {baseline}: wins", "ties", "losses", "win rate [95% CI]"]
    win_body = [[w["setting"], str(w["wins"]), str(w["ties"]), str(w["losses"]),
                 interval(w["win_rate"])] for w in wins]
    caption = (f"{len(table)} settings, {prompts} prompts; mean score per setting with "
               f"percentile-bootstrap 95% intervals ({resamples} resamples, seed {seed}); "
               + ", ".join(f"{s}: {better[signs[s]]}" for s in scores) + ".")
    if pareto:
        caption += f" Pareto front over {pareto[0]} and {pareto[1]}."
    win_caption = (f"Win rate against {baseline!r} under {win_scorer} ({better[signs[win_scorer]]}): "
                   "(wins + ties / 2) / prompts both settings answered.")
    md = [caption, "", markdown_table(header, body), win_caption, "",
          markdown_table(win_header, win_body)]
    if pareto:
        plot_pareto(table, pareto[0], pareto[1], (signs[pareto[0]], signs[pareto[1]]), front,
                    f"{prefix}.png")
        md.append(f"![Pareto front]({prefix.name}.png)\n")
    Path(f"{prefix}.md").write_text("\n".join(md))
    written = [f"{prefix}.json", f"{prefix}.md"] + ([f"{prefix}.png"] if pareto else [])
    return (caption + "\n\n" + plain_table(header, body) + "\n" + win_caption + "\n\n"
            + plain_table(win_header, win_body) + "\nwritten: " + ", ".join(written))


def nan_if_none(value) -> float:
    return math.nan if value is None else float(value)
