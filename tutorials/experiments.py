"""
Tutorial: the seed's comparison of hyperparameter optimisation methods, rendered from the
committed results of ``pyro-evidence experiment`` (``benchmarks/results/<experiment>.csv`` and
``<experiment>_trajectories.csv``).

Run from the repository root after (or without re-running) the experiment:

    pyro-evidence experiment synthetic --output-dir benchmarks/results
    python tutorials/experiments.py

It writes ``tutorials/experiments.md`` and its figures under ``tutorials/figures/``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(os.path.dirname(HERE), "benchmarks", "results")
NOISE = [("noise_000", 0.0), ("noise_010", 0.1), ("noise_025", 0.25), ("noise_050", 0.5)]


def load(directory, experiment):
    with open(os.path.join(directory, f"{experiment}.csv")) as f:
        runs = list(csv.DictReader(f))
    per_run = defaultdict(list)
    with open(os.path.join(directory, f"{experiment}_trajectories.csv")) as f:
        for row in csv.DictReader(f):
            per_run[(row["objective"], row["method"], row["seed"])].append((int(row["iteration"]), float(row["Q"])))
    # each run's best Q so far, then the mean over runs at every iteration
    curves = defaultdict(lambda: defaultdict(list))
    for (objective, method, _), points in per_run.items():
        best = -float("inf")
        for iteration, q in sorted(points):
            best = max(best, q)
            curves[(objective, method)][iteration].append(best)
    return runs, curves


def mean(rows, key):
    return statistics.mean(float(r[key]) for r in rows)


def panels(objectives, draw, path):
    """One panel per validation function; ``draw(ax, objective)`` plots and returns the labels."""
    fig, axes = plt.subplots(1, len(objectives), figsize=(6 * len(objectives), 4), squeeze=False)
    for ax, objective in zip(axes[0], objectives):
        xlabel, ylabel, title = draw(ax, objective)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.basename(path)


def render(experiment, directory, figures, out):
    runs, curves = load(directory, experiment)
    groups = defaultdict(list)
    for r in runs:
        groups[(r["objective"], r["method"])].append(r)
    objectives = sorted({o for o, _ in groups})

    def q_curves(ax, objective):
        for (o, method), by_iteration in sorted(curves.items()):
            if o == objective:
                its = sorted(by_iteration)
                ax.plot(its, [statistics.mean(by_iteration[i]) for i in its], label=method)
        return "hyperparameter iteration", f"best Q so far ({objective}), mean of runs", f"{experiment}: {objective}"

    def noise_curves(ax, objective):
        for (o, method), rows in sorted(groups.items()):
            if o == objective:
                ax.plot([s for _, s in NOISE], [mean(rows, k) for k, _ in NOISE], "o-", label=method)
        return (
            "σ of the noise added to the training inputs",
            "test RMSE (lower is better)",
            f"{experiment}: hyperparameters selected by {objective}",
        )

    q_png = panels(objectives, q_curves, os.path.join(figures, f"{experiment}_q.png"))
    noise_png = panels(objectives, noise_curves, os.path.join(figures, f"{experiment}_noise.png"))

    out += [f"## {experiment}", "", f"![best Q against iteration](figures/{q_png})", "", f"![test error against noise](figures/{noise_png})", ""]
    out += ["| validation | method | best Q | iterations to 99 % | test RMSE | RMSE at σ = 0.5 noise | seconds per run |", "|---|---|---|---|---|---|---|"]
    for (objective, method), rows in sorted(groups.items()):
        out.append(
            f"| {objective} | {method} | {mean(rows, 'best_q'):.3f} | {mean(rows, 'convergence'):.1f} | {mean(rows, 'test_error'):.3f} | "
            f"{mean(rows, 'noise_050'):.3f} | {mean(rows, 'seconds'):.2f} |"
        )
    out.append("")
    for objective in objectives:
        rows = {m: g for (o, m), g in groups.items() if o == objective}
        best_q = max(rows, key=lambda m: mean(rows[m], "best_q"))
        fastest = min(rows, key=lambda m: mean(rows[m], "seconds"))
        quickest = min(rows, key=lambda m: mean(rows[m], "convergence"))
        best_test = min(rows, key=lambda m: mean(rows[m], "test_error"))
        robust = min(rows, key=lambda m: mean(rows[m], "noise_050"))
        within = [
            m for m in rows if mean(rows[m], "best_q") >= mean(rows[best_q], "best_q") - 0.5
        ]
        out += [
            f"**{objective}.** The highest Q: `{best_q}` ({mean(rows[best_q], 'best_q'):.3f}); within 0.5 nats of it: "
            f"{', '.join(f'`{m}`' for m in sorted(within))}. Fewest iterations to 99 % of its own best improvement: "
            f"`{quickest}`. Cheapest per run: `{fastest}` ({mean(rows[fastest], 'seconds'):.2f} s). Lowest test RMSE: "
            f"`{best_test}`; lowest under σ = 0.5 input noise: `{robust}`.",
            "",
        ]
    return groups


def main(argv=None):
    parser = argparse.ArgumentParser(description="render the experiments' tables and figures")
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--output-dir", default=HERE)
    args = parser.parse_args(argv)
    figures = os.path.join(args.output_dir, "figures")
    os.makedirs(figures, exist_ok=True)
    experiments = [e for e in ("synthetic",) if os.path.exists(os.path.join(args.results, f"{e}.csv"))]
    out = [
        "# The seed's experiments: which hyperparameter method, when",
        "",
        f"Rendered by `python tutorials/experiments.py` on {time.strftime('%Y-%m-%d')} from the committed results in "
        "`benchmarks/results/` (each `.md` there names the command, commit and machine that produced it, and every "
        "deviation from the protocol). Every number below is read from those files.",
        "",
    ]
    for experiment in experiments:
        render(experiment, args.results, figures, out)
    path = os.path.join(args.output_dir, "experiments.md")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
