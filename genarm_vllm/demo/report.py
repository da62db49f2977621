"""Tables, plots and examples from the quickstart's scored completions (no vLLM here).

Reads <out>/sweep.jsonl and <out>/multi.jsonl (sweep rows with "scores", as
`genarm-vllm score` writes them) and writes sweep.json / sweep.md / sweep.png,
multi.json / multi.md / pareto.png and examples.md. The figures are genarm_vllm.jobs.report's
(`genarm-vllm report`): per-setting bootstrap means, the Pareto front and its plot; what is
the demo's own is the choice of columns, the guided-vs-unguided verdicts, the beta curve
and the examples.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from genarm_vllm.demo.scoring import SCORERS, SIGNS
from genarm_vllm.jobs.report import (
    interval,
    markdown_table,
    nan_if_none,
    pareto_front,
    plain_table,
    plot_pareto,
    read_rows,
    summarise,
)


def table_of(rows: list[dict], plan: dict, speeds: dict) -> list[dict]:
    """jobs.report.summarise's entry per setting (mean scores with bootstrap 95% intervals,
    mean length), plus the demo's columns: temperature, the control's matched beta, the
    share of completions that ended (EOS), tokens/s."""
    table = summarise(rows, list(SCORERS))
    settings = {s["name"]: s for s in plan["settings"]}
    for entry in table:
        setting = settings[entry["setting"]]
        mine = [r for r in rows if r.get("setting") == entry["setting"] and "error" not in r]
        own = setting["temperature"]
        entry["temperature"] = round(plan["temperature"] if own is None else own, 4)
        if own is not None and plan.get("control_beta"):  # the control: the base, sharpened
            entry["control_beta"] = plan["control_beta"]
        entry["ended"] = round(sum(r["finish_reason"] == "stop" for r in mine) / max(len(mine), 1), 3)
        if entry["setting"] in speeds:
            entry["tokens_per_s"] = round(speeds[entry["setting"]], 1)
    return table


def verdicts(table: list[dict]) -> list[dict]:
    """For each guided row: is its 95% interval above the unguided one, on both scorers?"""
    unguided = next(r for r in table if r["setting"] == "unguided")
    result = []
    for row in table:
        if row["beta"] is None:
            continue
        entry = {"setting": row["setting"]}
        for scorer in ("vader", "afinn"):
            entry[scorer] = {
                "gain": round(row[scorer]["mean"] - unguided[scorer]["mean"], 4),
                "intervals_apart": row[scorer]["low"] > unguided[scorer]["high"],
            }
        result.append(entry)
    return result


def _stage(out: Path, stage: str) -> tuple[dict, list[dict], dict]:
    return (json.loads((out / f"{stage}.plan.json").read_text()), read_rows(out / f"{stage}.jsonl"),
            json.loads((out / f"{stage}.speed.json").read_text()))


# ----------------------------------------------------------------------------- beta sweep


def sweep_report(out: Path) -> str:
    plan, rows, speeds = _stage(out, "sweep")
    table = table_of(rows, plan, speeds)
    checks = verdicts(table)
    (out / "sweep.json").write_text(json.dumps({
        "prompts": len(plan["prompts"]), "max_tokens": plan["max_tokens"],
        "table": table, "guided_vs_unguided": checks}, indent=2) + "\n")

    header = ["setting", "1/beta", "VADER [95% CI]", "AFINN [95% CI]", "mean tokens", "tokens/s"]
    body = [[
        r["setting"], f"{strength(r):g}", interval(r["vader"]), interval(r["afinn"]),
        f"{r.get('mean_tokens', 0):.1f}", f"{r.get('tokens_per_s', 0):.0f}",
    ] for r in table]
    caption = (f"{len(plan['prompts'])} held-out prompts, up to {plan['max_tokens']} tokens each, "
               "one sample per prompt and setting; VADER labelled the ARM's training pairs, "
               "AFINN did not.\n")
    (out / "sweep.md").write_text(caption + "\n" + markdown_table(header, body))
    plot_sweep(table, out / "sweep.png")

    lines = [plain_table(header, body)]
    for check in checks:
        parts = [
            f"{name.upper()} {check[name]['gain']:+.2f} "
            f"({'intervals apart' if check[name]['intervals_apart'] else 'intervals overlap'})"
            for name in ("vader", "afinn")
        ]
        lines.append(f"  {check['setting']} vs unguided: " + ", ".join(parts))
    return caption + "\n" + "\n".join(lines) + "\n"


def strength(row: dict) -> float:
    """1/beta of a sweep row: 0 when unguided; the control's matched 1/beta."""
    beta = row["beta"] or row.get("control_beta")
    return 1 / beta if beta else 0.0


def plot_sweep(table: list[dict], path: Path) -> None:
    """Each scorer's mean against guidance strength 1/beta: the GenARM curve and the control
    (the demo's own figure: jobs.report plots two scores against each other)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, scorer, label in zip(axes, ("vader", "afinn"), ("VADER compound (labelling scorer)",
                                                           "AFINN score (independent scorer)")):
        curve = [r for r in table if "control_beta" not in r]
        _errorbar(ax, [strength(r) for r in curve], [r[scorer] for r in curve], "o-",
                  "GenARM, sentiment ARM")
        controls = [r for r in table if "control_beta" in r]
        if controls:
            _errorbar(ax, [strength(r) for r in controls], [r[scorer] for r in controls], "s",
                      "control: sharpened base (no ARM)")
        ax.set_xlabel("guidance strength 1/beta (0 = unguided)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct guided by a sentiment ARM: mean reward, 95% bootstrap CI")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _errorbar(ax, x, cells, style, label):
    means = [c["mean"] for c in cells]
    errors = [[c["mean"] - c["low"] for c in cells], [c["high"] - c["mean"] for c in cells]]
    ax.errorbar(x, means, yerr=errors, fmt=style, capsize=4, label=label)


# ----------------------------------------------------------------------------- examples


def examples_report(out: Path, count: int = 2) -> str:
    """The first completions of `count` prompts spread over the list (not selected by
    score): unguided next to the strongest guidance."""
    plan = json.loads((out / "sweep.plan.json").read_text())
    rows = read_rows(out / "sweep.jsonl")
    guided = [s for s in plan["settings"] if s["beta"] is not None]
    strongest = min(guided, key=lambda s: s["beta"])["name"]
    prompts = plan["prompts"]
    picks = [i * len(prompts) // count for i in range(count)]
    by_key = {(r["setting"], r["prompt_index"]): r for r in rows if "error" not in r}
    md, text = ["# Example completions (prompts spread over the held-out list, not selected)\n"], []
    for index in picks:
        left, right = by_key[("unguided", index)], by_key[(strongest, index)]
        ls, rs = left["scores"], right["scores"]
        md.append(f"**{prompts[index]}**\n\n" + markdown_table(
            ["unguided", strongest],
            [[_cell(left["generated_text"]), _cell(right["generated_text"])],
             [f"VADER {ls['vader']:.2f}, AFINN {ls['afinn']:g}",
              f"VADER {rs['vader']:.2f}, AFINN {rs['afinn']:g}"]]))
        text.append(f"Prompt: {prompts[index]}\n" + side_by_side(
            f"[unguided] VADER {ls['vader']:.2f}\n{left['generated_text'].strip()}",
            f"[{strongest}] VADER {rs['vader']:.2f}\n{right['generated_text'].strip()}"))
    (out / "examples.md").write_text("\n".join(md))
    return "\n".join(text)


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\n", " ")


def side_by_side(left: str, right: str, width: int = 48) -> str:
    def wrap(text):
        return [line for para in text.splitlines() for line in (textwrap.wrap(para, width) or [""])]

    a, b = wrap(left), wrap(right)
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return "\n".join(f"  {x.ljust(width)}   {y}" for x, y in zip(a, b)) + "\n"


# ----------------------------------------------------------------------------- weight sweep


def multi_report(out: Path) -> str:
    plan, rows, speeds = _stage(out, "multi")
    table = table_of(rows, plan, {})
    # Fewer first-person words is the impersonal ARM's aim: better is left on that axis.
    x, y = "first_person", "vader"
    front = pareto_front([(nan_if_none(e[x]["mean"]), nan_if_none(e[y]["mean"])) for e in table],
                         (SIGNS[x], SIGNS[y]))
    for entry, on_front in zip(table, front):
        entry["pareto"] = on_front
    beta = plan["settings"][0]["beta"]
    (out / "multi.json").write_text(json.dumps({
        "prompts": len(plan["prompts"]), "max_tokens": plan["max_tokens"],
        "beta": beta, "tokens_per_s_all": round(speeds["all"], 1),
        "table": table}, indent=2) + "\n")
    header = ["w_sentiment", "w_impersonal", "VADER [95% CI]", "AFINN [95% CI]",
              "1st-person words /100 [95% CI]", "mean tokens"]
    body = [[f"{r['weights'][0]:g}", f"{r['weights'][1]:g}", interval(r["vader"]),
             interval(r["afinn"]), interval(r["first_person"], 1), f"{r.get('mean_tokens', 0):.1f}"]
            for r in table]
    caption = (f"beta={beta:g}, {len(plan['prompts'])} held-out prompts, up to "
               f"{plan['max_tokens']} tokens; every setting is a per-request choice in one batch "
               f"of one engine ({speeds['all']:.0f} tokens/s overall).\n")
    (out / "multi.md").write_text(caption + "\n" + markdown_table(header, body))
    plot_pareto(table, x, y, (SIGNS[x], SIGNS[y]), front, out / "pareto.png",
                title=f"Per-request weights (w_sentiment, w_impersonal), beta={beta:g}, one engine",
                labels={x: "first-person pronouns per 100 words: fewer is more impersonal",
                        y: "mean VADER compound: higher is more positive"})
    return caption + "\n" + plain_table(header, body)


def write_report(out: Path, multi: bool = True) -> None:
    """Print the tables and examples and write every report file under `out`."""
    print("\n== Sentiment guidance, beta sweep ==\n" + sweep_report(out), flush=True)
    print("== Example completions ==\n" + examples_report(out), flush=True)
    if multi and (out / "multi.jsonl").exists():
        print("== Two ARMs, weights chosen per request ==\n" + multi_report(out), flush=True)
    written = sorted(p.name for p in out.iterdir()
                     if p.suffix in (".md", ".png", ".json") and p.name.count(".") == 1)
    print(f"written to {out}/: {', '.join(written)}")
