"""Tables, plots and examples from the quickstart's scored completions (no vLLM here).

Reads <out>/sweep.jsonl and <out>/multi.jsonl (one scored completion per line) and writes
sweep.json / sweep.md / sweep.png, multi.json / multi.md / pareto.png and examples.md.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from genarm_vllm.jobs.report import bootstrap_mean, markdown_table, plain_table


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summarise(rows: list[dict], settings: list[dict], speeds: dict) -> list[dict]:
    """One table row per setting: mean scores with bootstrap 95% intervals, length, speed."""
    table = []
    for setting in settings:
        mine = [r for r in rows if r["setting"] == setting["name"]]
        entry = {
            "setting": setting["name"], "beta": setting["beta"], "weights": setting["weights"],
            "temperature": round(setting["temperature"], 4), "n": len(mine),
        }
        if "control_beta" in setting:
            entry["control_beta"] = setting["control_beta"]
        for scorer in ("vader", "afinn", "first_person", "num_tokens"):
            mean, low, high = bootstrap_mean([r[scorer] for r in mine])
            entry[scorer] = {"mean": round(mean, 4), "low": round(low, 4), "high": round(high, 4)}
        entry["ended"] = round(sum(r["finish_reason"] == "stop" for r in mine) / max(len(mine), 1), 3)
        if setting["name"] in speeds:
            entry["tokens_per_s"] = round(speeds[setting["name"]], 1)
        table.append(entry)
    return table


def interval(cell: dict, digits: int = 2) -> str:
    return f"{cell['mean']:.{digits}f} [{cell['low']:.{digits}f}, {cell['high']:.{digits}f}]"


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


# ----------------------------------------------------------------------------- beta sweep


def sweep_report(out: Path) -> str:
    plan = json.loads((out / "sweep.plan.json").read_text())
    rows = read_rows(out / "sweep.jsonl")
    speeds = json.loads((out / "sweep.speed.json").read_text())
    table = summarise(rows, plan["settings"], speeds)
    checks = verdicts(table)
    (out / "sweep.json").write_text(json.dumps({
        "prompts": len(plan["prompts"]), "max_tokens": plan["max_tokens"],
        "table": table, "guided_vs_unguided": checks}, indent=2) + "\n")

    header = ["setting", "1/beta", "VADER [95% CI]", "AFINN [95% CI]", "mean tokens", "tokens/s"]
    body = [[
        r["setting"], f"{strength(r):g}", interval(r["vader"]), interval(r["afinn"]),
        f"{r['num_tokens']['mean']:.1f}", f"{r.get('tokens_per_s', 0):.0f}",
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
    picks = [prompts[i * len(prompts) // count] for i in range(count)]
    by_key = {(r["setting"], r["prompt"]): r for r in rows}
    md, text = ["# Example completions (prompts spread over the held-out list, not selected)\n"], []
    for prompt in picks:
        left, right = by_key[("unguided", prompt)], by_key[(strongest, prompt)]
        md.append(f"**{prompt}**\n\n" + markdown_table(
            ["unguided", strongest],
            [[_cell(left["text"]), _cell(right["text"])],
             [f"VADER {left['vader']:.2f}, AFINN {left['afinn']:g}",
              f"VADER {right['vader']:.2f}, AFINN {right['afinn']:g}"]]))
        text.append(f"Prompt: {prompt}\n" + side_by_side(
            f"[unguided] VADER {left['vader']:.2f}\n{left['text'].strip()}",
            f"[{strongest}] VADER {right['vader']:.2f}\n{right['text'].strip()}"))
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
    plan = json.loads((out / "multi.plan.json").read_text())
    rows = read_rows(out / "multi.jsonl")
    speeds = json.loads((out / "multi.speed.json").read_text())
    table = summarise(rows, plan["settings"], {})
    (out / "multi.json").write_text(json.dumps({
        "prompts": len(plan["prompts"]), "max_tokens": plan["max_tokens"],
        "beta": plan["settings"][0]["beta"], "tokens_per_s_all": round(speeds["all"], 1),
        "table": table}, indent=2) + "\n")
    header = ["w_sentiment", "w_impersonal", "VADER [95% CI]", "AFINN [95% CI]",
              "1st-person words /100 [95% CI]", "mean tokens"]
    body = [[f"{r['weights'][0]:g}", f"{r['weights'][1]:g}", interval(r["vader"]),
             interval(r["afinn"]), interval(r["first_person"], 1), f"{r['num_tokens']['mean']:.1f}"]
            for r in table]
    caption = (f"beta={plan['settings'][0]['beta']:g}, {len(plan['prompts'])} held-out prompts, up to "
               f"{plan['max_tokens']} tokens; every setting is a per-request choice in one batch "
               f"of one engine ({speeds['all']:.0f} tokens/s overall).\n")
    (out / "multi.md").write_text(caption + "\n" + markdown_table(header, body))
    plot_pareto(table, out / "pareto.png", plan["settings"][0]["beta"])
    return caption + "\n" + plain_table(header, body)


def plot_pareto(table: list[dict], path: Path, beta: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in table:
        x, y = r["first_person"], r["vader"]
        unguided = r["weights"] == [0.0, 0.0]
        ax.errorbar([x["mean"]], [y["mean"]],
                    xerr=[[x["mean"] - x["low"]], [x["high"] - x["mean"]]],
                    yerr=[[y["mean"] - y["low"]], [y["high"] - y["mean"]]],
                    fmt="s" if unguided else "o", color="gray" if unguided else "C0", capsize=3)
        label = "unguided" if unguided else f"({r['weights'][0]:g}, {r['weights'][1]:g})"
        ax.annotate(label, (x["mean"], y["mean"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    guided = sorted((r for r in table if r["weights"] != [0.0, 0.0]), key=lambda r: r["weights"][1])
    ax.plot([r["first_person"]["mean"] for r in guided], [r["vader"]["mean"] for r in guided],
            "-", color="C0", alpha=0.5)
    ax.set_xlabel("first-person pronouns per 100 words: fewer is more impersonal")
    ax.set_ylabel("mean VADER compound: higher is more positive")
    ax.set_title(f"Per-request weights (w_sentiment, w_impersonal), beta={beta:g}, one engine",
                 fontsize=10)
    ax.invert_xaxis()  # better on both objectives = up and to the right
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, multi: bool = True) -> None:
    """Print the tables and examples and write every report file under `out`."""
    print("\n== Sentiment guidance, beta sweep ==\n" + sweep_report(out), flush=True)
    print("== Example completions ==\n" + examples_report(out), flush=True)
    if multi and (out / "multi.jsonl").exists():
        print("== Two ARMs, weights chosen per request ==\n" + multi_report(out), flush=True)
    written = sorted(p.name for p in out.iterdir()
                     if p.suffix in (".md", ".png", ".json") and p.name.count(".") == 1)
    print(f"written to {out}/: {', '.join(written)}")
