"""Budget study (issue 29): tables and plots from a results file of scripts/study_cells.py.

    python scripts/study_report.py --config configs/study/part1.yaml   # part 1: Markdown to stdout, plots to docs/study/
    python scripts/study_report.py --part2                              # part 2: docs/study/part2-STEPS.json files

Tune phase: every setting of each method on the validation texts and their geometric mean (the selection
criterion), the best per method marked. Test phase: held-out perplexity per method, budget and sparsity; one
figure of perplexity against tokens trained (one line per method; dense and one-shot as flat lines), and one of
PILoT's diagnostics over training (docs/METHOD.md section 4: alpha, balance, L1 ratio, prune damage). Two
comparisons read off the test cells: each HAM method against its base method, seed by seed (issue 28 asks for
two seeds), and the issue's goal, PILoT's best against the best control, column by column. Part 2's sweep results
(scripts/study_part2.sh, one file per budget and seed) are read as test cells whose budget is the tokens trained.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DIAGNOSTICS = ("alpha", "balance", "l1_ratio", "prune_damage")


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def share_of_pretraining(budget: float) -> str:
    return f"{budget:.0%}"


def tokens(budget: float) -> str:
    return f"{budget:,.0f} tokens"


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def settings_text(settings: dict) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(settings.items())) or "–"


def best_settings(rows: list[dict]) -> dict[str, dict]:
    """Per method, the tune row with the lowest geometric mean of the validation perplexities (seed 0: the
    grid; other seeds check a close call and are read beside it)."""
    best = {}
    for row in rows:
        if row["seed"] != 0:
            continue
        score = geomean(row["perplexity"].values())
        if row["method"] not in best or score < best[row["method"]][0]:
            best[row["method"]] = (score, row)
    return {method: row for method, (_, row) in best.items()}


def tune_table(rows: list[dict], texts: list[str]) -> str:
    best = {id(r) for r in best_settings(rows).values()}
    lines = [f"| method | settings | seed | {' | '.join(texts)} | geo. mean | steps | time (s) |",
             "|---|---|---|" + "---|" * (len(texts) + 3)]
    first = {}
    for i, row in enumerate(rows):
        first.setdefault(row["method"], i)
    for row in sorted(rows, key=lambda r: (first[r["method"]], r["seed"])):  # a method's rows together, in run order
        mark = "**" if id(row) in best else ""
        ppl = " | ".join(f"{row['perplexity'][t]:.2f}" for t in texts)
        lines.append(f"| {mark}{row['method']}{mark} | {settings_text(row['settings'])} | {row['seed']} | {ppl} | "
                     f"{mark}{geomean(row['perplexity'][t] for t in texts):.2f}{mark} | {row.get('steps', 0)} | "
                     f"{row['time_s']:.0f} |")
    return "\n".join(lines)


def seeds_of_cells(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(method, sparsity, budget) -> the rows of that cell, one per seed."""
    cells = defaultdict(list)
    for row in rows:
        cells[(row["method"], row["sparsity"], row["budget"])].append(row)
    return cells


def mark_superseded(rows: list[dict], chosen: dict[str, dict]) -> list[dict]:
    """Test rows run with a setting that the config no longer chooses for their method (a later tune changed it)
    keep their numbers under a name of their own, which names the settings that differ from the choice ('default':
    the library's), so that the tables show them while the goal, the HAM comparison and the plots read the current
    choice only."""
    marked = []
    for row in rows:
        ran, now = row.get("settings", {}), chosen.get(row["method"], {})
        if ran != now:
            differs = {k: ran.get(k, "default") for k in sorted({*ran, *now}) if ran.get(k) != now.get(k)}
            row = {**row, "method": f"{row['method']} ({settings_text(differs)}; superseded)",
                   "superseded_from": row["method"]}
        marked.append(row)
    return marked


def methods_in_order(rows: list[dict]) -> list[str]:
    """The methods of the rows in the order they first ran, each superseded variant right after its method."""
    first = {}
    for row in rows:
        first.setdefault(row.get("superseded_from", row["method"]), len(first))
    place = {r["method"]: (first[r.get("superseded_from", r["method"])], "superseded_from" in r) for r in rows}
    return sorted(place, key=place.get)


def test_table(rows: list[dict], texts: list[str], budget_label=share_of_pretraining) -> str:
    """Rows: method; columns: (sparsity, budget) per text; seeds averaged (their spread in brackets)."""
    cells = seeds_of_cells(rows)
    columns = sorted({(r["sparsity"], r["budget"]) for r in rows if r["budget"] > 0})
    lines = []
    for text in texts:
        lines += [f"\n{text} (held out):\n", "| method | " + " | ".join(f"{s} @ {budget_label(b)}" for s, b in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for method in methods_in_order(rows):
            values = []
            for sparsity, budget in columns:
                found = cells.get((method, sparsity, budget)) or cells.get((method, sparsity, 0.0)) \
                    or cells.get((method, "0.0", 0.0)) or []
                ppl = [r["perplexity"][text] for r in found]
                values.append("–" if not ppl else f"{mean(ppl):.2f}" +
                              (f" ({min(ppl):.2f}-{max(ppl):.2f})" if len(ppl) > 1 else ""))
            lines.append(f"| {method} | " + " | ".join(values) + " |")
    return "\n".join(lines)


PILOT_METHODS = ("pilot", "pilot+wanda")  # PILoT from dense and from the best one-shot start
# the goal's "best of gmp and one-shot + fine-tuning"; in part 1 the fine-tuning rows are the chosen (fixed-mask) cells,
# in part 2's sweep the fixed mask is a cell of its own (`+fixed`)
CONTROLS = ("gmp", "finetune+wanda", "finetune+sparsegpt", "finetune+wanda+fixed", "finetune+sparsegpt+fixed")
CONSTANT_ALPHA = "spred"  # the same m ⊙ w training with α held fixed (the paper's ablation): shown beside the goal


def ham_table(rows: list[dict], texts: list[str], budget_label=share_of_pretraining) -> str:
    """Each `X+ham` cell against the `X` cell of the same sparsity, budget and seed: the ratio per text (below 1:
    HAM helped). Only pairs where both cells ran appear."""
    by_cell = {(r["method"], r["sparsity"], r["budget"], r["seed"]): r for r in rows}
    lines = [f"| HAM / base | sparsity @ budget | seed | {' | '.join(texts)} |", "|---|---|---|" + "---|" * len(texts)]
    for row in sorted(rows, key=lambda r: (r["method"], r["budget"], r["sparsity"], r["seed"])):
        base = by_cell.get((row["method"].removesuffix("+ham"), row["sparsity"], row["budget"], row["seed"]))
        if not row["method"].endswith("+ham") or base is None:
            continue
        ratios = " | ".join(f"{row['perplexity'][t] / base['perplexity'][t]:.3f}" for t in texts)
        lines.append(f"| {row['method']} / {base['method']} | {row['sparsity']} @ {budget_label(row['budget'])} | {row['seed']} "
                     f"| {ratios} |")
    return "\n".join(lines)


def _best_mean(cells: dict, methods, sparsity: str, budget: float, text: str) -> tuple[float, str] | None:
    """The lowest seed-mean perplexity on `text` among `methods` in one column, with its method (None: none ran)."""
    means = [(mean(r["perplexity"][text] for r in seeds), m) for m in methods
             if (seeds := cells.get((m, sparsity, budget)))]
    return min(means) if means else None


def goal_table(rows: list[dict], texts: list[str], budget_label=share_of_pretraining) -> str:
    """Per column (sparsity, budget) and text: PILoT's best method over the best control (seed means), the ratio,
    and whether it is the >= 5% lead the goal asks for (ratio <= 0.95). Beside it, not counted in the goal: spred
    (constant α) over the same control, since at long budgets it is the m ⊙ w variant closest to the controls."""
    cells = seeds_of_cells(rows)
    columns = sorted({(r["sparsity"], r["budget"]) for r in rows if r["budget"] > 0})
    lines = ["| sparsity @ budget | text | best PILoT | best control | ratio | >= 5% lead | spred / control |",
             "|---|---|---|---|---|---|---|"]
    for sparsity, budget in columns:
        for t in texts:
            pilot, control, spred = (_best_mean(cells, methods, sparsity, budget, t)
                                     for methods in (PILOT_METHODS, CONTROLS, (CONSTANT_ALPHA,)))
            if not pilot or not control:
                continue
            (p, pm), (c, cm) = pilot, control
            lines.append(f"| {sparsity} @ {budget_label(budget)} | {t} | {pm} {p:.2f} | {cm} {c:.2f} | {p / c:.3f} | "
                         f"{'yes' if p / c <= 0.95 else 'no'} | {f'{spred[0] / c:.3f}' if spred else '–'} |")
    return "\n".join(lines)


def _pyplot():
    """matplotlib's pyplot on a file backend, or None (with a note) where it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install matplotlib)")
        return None
    return plt


def plot_curves(rows: list[dict], texts: list[str], pretraining_tokens: int, out: Path) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    sparsities = sorted({r["sparsity"] for r in rows if r["budget"] > 0})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    # tab10 and a marker per round of ten: no two of up to 40 methods look alike (dense is a flat black line)
    looks = {m: {"color": "black"} if m == "dense" else
             {"color": plt.get_cmap("tab10")(i % 10), "marker": "os^D"[i // 10 % 4]} for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(texts), len(sparsities), figsize=(5 * len(sparsities), 3.6 * len(texts)),
                             squeeze=False)
    for j, sparsity in enumerate(sparsities):
        for i, text in enumerate(texts):
            ax = axes[i][j]
            for method in methods:
                mine = [r for r in rows if r["method"] == method and r["sparsity"] in (sparsity, "0.0")]
                if not mine:
                    continue
                if all(r["budget"] == 0 for r in mine):  # dense or one-shot: no training tokens
                    ax.axhline(mean(r["perplexity"][text] for r in mine), ls="--", lw=1, label=method,
                               color=looks[method]["color"])
                    continue
                by_budget = defaultdict(list)
                for r in mine:
                    by_budget[r["budget"]].append(r["perplexity"][text])
                budgets = sorted(by_budget)
                ax.plot([b * pretraining_tokens for b in budgets], [mean(by_budget[b]) for b in budgets],
                        label=method, **looks[method])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{text}, sparsity {sparsity}")
            ax.set_xlabel("tokens trained")
            ax.set_ylabel("perplexity")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def plot_diagnostics(rows: list[dict], out: Path, budget_label=share_of_pretraining) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    pilot = [r for r in rows if r["method"].startswith(("pilot", "spred")) and r.get("train_log")]
    if not pilot:
        return None
    # One colour per method, one line style per budget, one marker per sparsity: a run is told apart by its line
    # alone, and the legend sits below the panels, where it crowds none of them however many runs there are.
    methods = list(dict.fromkeys(r["method"] for r in pilot))
    budgets = sorted({r["budget"] for r in pilot})
    sparsities = sorted({r["sparsity"] for r in pilot})
    styles, markers = ("-", "--", ":", "-."), ("o", "s", "^", "D")
    legend_rows = math.ceil(len(pilot) / 4)
    height = 3.4 + 0.2 * legend_rows
    fig, axes = plt.subplots(1, len(DIAGNOSTICS), figsize=(4.2 * len(DIAGNOSTICS), height))
    for row in pilot:
        look = {"color": plt.get_cmap("tab10")(methods.index(row["method"]) % 10),
                "ls": styles[budgets.index(row["budget"]) % len(styles)],
                "marker": markers[sparsities.index(row["sparsity"]) % len(markers)], "markevery": 0.25, "ms": 3,
                "label": f"{row['method']} {row['sparsity']} @ {budget_label(row['budget'])} s{row['seed']}"}
        for ax, name in zip(axes, DIAGNOSTICS):
            points = [(h["step"] / row["steps"], h[name]) for h in row["train_log"] if name in h]
            if points:
                ax.plot(*zip(*points), **look)
    for ax, name in zip(axes, DIAGNOSTICS):
        ax.set_title(name)
        ax.set_xlabel("share of the run's steps")
        if name in ("alpha", "prune_damage"):
            ax.set_yscale("symlog", linthresh=1e-6)
    lines = {label: line for ax in axes for line, label in zip(*ax.get_legend_handles_labels())}  # one per run
    fig.legend(list(lines.values()), list(lines), loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, (0.2 * legend_rows + 0.1) / height, 1, 1))
    fig.savefig(out, dpi=110)
    return out


PART2_RESULTS = "docs/study/part2-*.json"  # one file per budget and seed, written by scripts/study_part2.sh


def part2_rows(paths) -> list[dict]:
    """Part 2's sweep rows as test cells: the seed the cell ran with (the training seed, or the calibration seed of
    a one-shot cell; 42, the default, where neither is recorded), the budget in tokens trained (0 for dense and
    one-shot), and '+kd' dropped from the names (every trained method there distills), so that the tables and the
    goal read them as they read part 1. A one-shot or dense row repeated in several files counts once."""
    rows = {}
    for path in paths:
        for r in json.loads(Path(path).read_text()):
            method = r["method"].removesuffix("+kd")
            sparsity = "0.0" if method == "dense" else r["sparsity"]
            budget = float(r.get("tokens_trained", 0))
            settings = r.get("settings") or {}
            seed = (settings.get("training") or settings.get("calibration") or {}).get("seed", 42)
            rows[(method, sparsity, budget, seed)] = {
                "phase": "test", "method": method, "sparsity": sparsity, "budget": budget, "seed": seed,
                "perplexity": r["perplexity"], "train_log": r.get("train_log"),
                "steps": (r.get("train_log") or [{"step": 0}])[-1]["step"], "time_s": r["time_s"]}
    return list(rows.values())


def print_test_report(test: list[dict], texts: list[str], pretraining_tokens: int, plots: Path, name: str,
                      budget_label=share_of_pretraining) -> None:
    print(test_table(test, texts, budget_label))
    current = [r for r in test if "superseded_from" not in r]  # everything but the table reads the current choice
    print("\nHAM against its base method, seed by seed (ratio of perplexities; below 1: HAM helped):\n")
    print(ham_table(current, texts, budget_label))
    print("\nThe goal: PILoT's best against the best of gmp and one-shot + fine-tuning (seed means):\n")
    print(goal_table(current, texts, budget_label))
    plots.mkdir(parents=True, exist_ok=True)
    for path in (plot_curves(current, texts, pretraining_tokens, plots / f"{name}-curves.png"),
                 plot_diagnostics(current, plots / f"{name}-diagnostics.png", budget_label)):
        if path:
            print(f"\n![{path.stem}]({os.path.relpath(path, ROOT / 'docs')})")


def read_config(path: Path) -> dict:
    """A study config; `extends: OTHER.yaml` (beside it) takes every top-level key of OTHER that this file does not
    set, and a key set to null here drops OTHER's, so that a check on one part repeats none of its settings."""
    config = yaml.safe_load(path.read_text())
    base_name = config.pop("extends", None)
    if base_name is None:
        return config
    dropped = {k for k, v in config.items() if v is None}
    return {k: v for k, v in {**read_config(path.parent / base_name), **config}.items() if k not in dropped}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="a part 1 study config (configs/study/part1.yaml)")
    p.add_argument("--part2", action="store_true", help=f"report part 2 from {PART2_RESULTS} instead")
    p.add_argument("--plots", type=Path, default=ROOT / "docs" / "study", help="folder for the figures")
    a = p.parse_args()
    if a.part2 == (a.config is not None):
        p.error("give either --config CONFIG (part 1) or --part2")
    if a.part2:
        test = part2_rows(sorted(glob.glob(str(ROOT / PART2_RESULTS))))
        if not test:
            p.error(f"no part 2 results in {PART2_RESULTS}: run scripts/study_part2.sh first")
        print(f"## Part 2 ({len(test)} cells; held-out texts; budgets in tokens trained)")
        print_test_report(test, list(test[0]["perplexity"]), 1, a.plots, "part2", tokens)
        return
    config = read_config(a.config)
    results = ROOT / config["results"]
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.is_file() else []
    tune = [r for r in rows if r["phase"] == "tune"]
    test = mark_superseded([r for r in rows if r["phase"] == "test"], config["test"].get("chosen") or {})
    if tune:
        print(f"## Tune phase ({len(tune)} cells; sparsity {tune[0]['sparsity']}, budget {config['tune']['budget']:.0%}"
              " of pretraining; validation texts)\n")
        print(tune_table(tune, config["texts"]["tune"]))
        print("\nBest per method (lowest geometric mean):")
        for method, row in best_settings(tune).items():
            print(f"- {method}: {settings_text(row['settings'])}")
    if test:
        print(f"\n## Test phase ({len(test)} cells; held-out texts)")
        pretraining = json.loads((ROOT / config["model"] / "pretraining.json").read_text())["tokens_trained"]
        print_test_report(test, config["texts"]["test"], pretraining, a.plots, config["name"])


if __name__ == "__main__":
    main()
