"""Writes an experiment's results: one CSV row per run, the trajectories, and a Markdown report of means ± deviations."""

from __future__ import annotations

import csv
import math
import os
import statistics
import time
from dataclasses import asdict

import torch

from .runner import DEVIATIONS


def _mean_std(values):
    values = [v for v in values if not math.isnan(v)]  # failed runs
    if not values:
        return "failed"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def write_results(results, directory, command, stem=None, deviations=None):
    """``{stem}.csv`` (one row per run), ``{stem}_trajectories.csv`` (Q at every iteration) and
    ``{stem}.md`` (means ± standard deviations over runs, the noise table, the command, the commit,
    the machine and the ``deviations``, by default the experiment's); ``stem`` defaults to the
    experiment's name."""
    experiment = results[0].experiment
    stem = stem or experiment
    os.makedirs(directory, exist_ok=True)
    csv_path, md_path = os.path.join(directory, f"{stem}.csv"), os.path.join(directory, f"{stem}.md")
    _write_csvs(results, csv_path, os.path.join(directory, f"{stem}_trajectories.csv"))
    lines = _report(results, command, deviations or DEVIATIONS[experiment])
    with open(md_path, "w") as f:
        f.write("\n".join(lines))
    return csv_path, md_path


def _write_csvs(results, path, trajectories):
    fields = [k for k in asdict(results[0]) if k != "trajectory"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in results:
            writer.writerow({k: v for k, v in asdict(r).items() if k in fields})
    with open(trajectories, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["objective", "method", "seed", "iteration", "Q"])
        for r in results:
            writer.writerows([r.objective, r.method, r.seed, i + 1, q] for i, q in enumerate(r.trajectory))


def _commit():
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - outside a checkout
        return "unknown"


def _report(results, command, deviations):
    """The Markdown report's lines: the main table, the noise table, collapsed and failed runs, deviations."""
    import platform

    experiment = results[0].experiment
    metric = results[0].metric
    groups = {}
    for r in results:
        groups.setdefault((r.objective, r.method), []).append(r)
    lines = [
        f"# Experiment: {experiment}",
        "",
        f"Command: `{command}`  ",
        f"Commit: `{_commit()}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical cores, torch {torch.__version__}  ",
        f"Date: {time.strftime('%Y-%m-%d')}",
        "",
        f"| validation | method | hyper lr | best Q | convergence (iteration) | test {metric} | {metric}, w + N(0, 0.25²) | "
        f"{metric}, w + N(0, 0.5²) | seconds per run | collapsed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (objective, method), rs in groups.items():
        finished = [r for r in rs if not r.failed]
        lines.append(
            f"| {objective} | {method} | {rs[0].lr:g} | {_mean_std([r.best_q for r in rs])} | {_mean_std([math.nan if r.failed else float(r.convergence) for r in rs])} | "
            f"{_mean_std([r.test for r in rs])} | {_mean_std([r.test_perturbed_025 for r in rs])} | "
            f"{_mean_std([r.test_perturbed_050 for r in rs])} | {_mean_std([r.seconds for r in rs])} | "
            f"{sum(r.collapsed for r in finished)} of {len(finished)} |"
        )
    lines += ["", f"## Noise on the training inputs (test {metric}, the selected hyperparameters kept)", "",
              "| validation | method | σ = 0 | σ = 0.1 | σ = 0.25 | σ = 0.5 |", "|---|---|---|---|---|---|"]
    for (objective, method), rs in groups.items():
        lines.append(
            f"| {objective} | {method} | " + " | ".join(_mean_std([getattr(r, f'noise_{k}') for r in rs]) for k in ("000", "010", "025", "050")) + " |"
        )
    return lines + _exceptions(results, metric) + ["", "## Deviations from the protocol", "", *[f"- {d}" for d in deviations], ""]


def _exceptions(results, metric):
    lines = []
    collapsed = [r for r in results if r.collapsed and not r.failed]
    if collapsed:
        lines += ["", "## Collapsed runs (test predictions that ignore the inputs)", "",
                  "The selected prior switched the model off; these runs are kept in the means above.", ""]
        lines += [f"- {r.objective}, {r.method}, seed {r.seed}: best Q {r.best_q:.3f}, test {metric} {r.test:.3f}" for r in collapsed]
    failed = [r for r in results if r.failed]
    if failed:
        lines += ["", "## Failed runs (left out of the means)", ""]
        lines += [f"- {r.objective}, {r.method}, seed {r.seed}: {r.failed}" for r in failed]
    return lines
