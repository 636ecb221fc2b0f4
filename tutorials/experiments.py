"""
Tutorial: the seed's comparison of hyperparameter optimisation methods, rendered from the
committed results of ``pyro-evidence experiment`` (``benchmarks/results/<experiment>.csv`` and
``<experiment>_trajectories.csv``).

Run from the repository root after (or without re-running) the experiment:

    pyro-evidence experiment synthetic --output-dir benchmarks/results
    pyro-evidence experiment mnist --pool 2 --output-dir benchmarks/results
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
# Rows made by separate commands join their experiment's tables: MNIST's Laplace-evidence runs came later.
SOURCES = {"synthetic": [""], "mnist": ["", "mnist_laplace"]}
NOISE = [("noise_000", 0.0), ("noise_010", 0.1), ("noise_025", 0.25), ("noise_050", 0.5)]


def _sources(directory, experiment):
    paths = [os.path.join(directory, sub) for sub in SOURCES.get(experiment, [""])]
    return [p for p in paths if os.path.exists(os.path.join(p, f"{experiment}.csv"))]


# the column names of results written before the metric-neutral names (the committed CSVs)
RENAMED = {"test_error": "test", "error_perturbed_025": "test_perturbed_025", "error_perturbed_050": "test_perturbed_050"}


def load(directory, experiment):
    runs, per_run = [], defaultdict(list)
    for source in _sources(directory, experiment):
        with open(os.path.join(source, f"{experiment}.csv")) as f:
            runs += [{RENAMED.get(k, k): v for k, v in row.items()} for row in csv.DictReader(f)]
        with open(os.path.join(source, f"{experiment}_trajectories.csv")) as f:
            for row in csv.DictReader(f):
                per_run[(row["objective"], row["method"], row["seed"])].append((int(row["iteration"]), float(row["Q"])))
    # each run's best Q so far, then the mean over runs at every iteration
    curves = defaultdict(lambda: defaultdict(list))
    for (objective, method, _), points in per_run.items():
        best = -float("inf")
        for iteration, q in sorted(points):
            best = max(best, q)
            curves[(objective, method)][iteration].append(best)
    for r in runs:  # a selection that meets a non-finite step stops early
        r["iterations"] = len(per_run.get((r["objective"], r["method"], r["seed"]), ()))
    return runs, curves


INTRO = {
    "synthetic": "Linear regression on the seed's polynomial design (m = 40, features x⁰…x⁹, sin x, cos x), one prior "
    "precision per weight: 12 hyperparameters. E is the test RMSE (lower is better).",
    "mnist": "A Bayesian MLP with 300 tanh hidden units on the real MNIST sample (3,000 training images, 1,000 test "
    "images), one prior precision per layer: 2 hyperparameters. The inner fit is a neural network's, non-convex and "
    "never run to its optimum: each hyperparameter iteration continues it for a fixed budget. E is the test accuracy "
    "(higher is better). Beside the seed's two validation functions, the Laplace evidence with Kronecker-factored "
    "GGN curvature (`laplace`, a later command, listed second below).",
}


def provenance(directory, experiment):
    """The command and commit lines of each results table the experiment's rows come from."""
    keep = ("Command:", "Commit:", "Machine:")
    lines = []
    for source in _sources(directory, experiment):
        with open(os.path.join(source, f"{experiment}.md")) as f:
            lines += [line.rstrip() for line in f if line.startswith(keep)] + [""]
    return lines[:-1]


def mean(rows, key):
    """Over the runs that finished (a failed run's metrics are NaN)."""
    values = [float(r[key]) for r in rows if not r.get("failed")]
    return statistics.mean(values) if values else float("nan")


def sd(rows, key):
    values = [float(r[key]) for r in rows if not r.get("failed")]
    return statistics.stdev(values) if len(values) > 1 else 0.0


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
    metric = "RMSE" if experiment == "synthetic" else "accuracy"
    best_of = min if metric == "RMSE" else max
    direction = "lower" if metric == "RMSE" else "higher"
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
            f"test {metric} ({direction} is better)",
            f"{experiment}: hyperparameters selected by {objective}",
        )

    q_png = panels(objectives, q_curves, os.path.join(figures, f"{experiment}_q.png"))
    noise_png = panels(objectives, noise_curves, os.path.join(figures, f"{experiment}_noise.png"))

    out += [f"## {experiment}", "", INTRO[experiment], "", *provenance(directory, experiment), "",
            "The full tables, with standard deviations and the deviations from the protocol: "
            + ", ".join(f"`{os.path.relpath(os.path.join(s, experiment + '.md'), os.path.dirname(HERE))}`"
                        for s in _sources(directory, experiment)) + ".", ""]
    out += [f"![best Q against iteration](figures/{q_png})", "", f"![test error against noise](figures/{noise_png})", ""]
    out += [
        f"| validation | method | iterations run | best Q | iterations to 99 % | test {metric} | {metric}, w + N(0, 0.5²) | {metric} at σ = 0.5 noise | seconds per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (objective, method), rows in sorted(groups.items()):
        out.append(
            f"| {objective} | {method} | {mean(rows, 'iterations'):.1f} | {mean(rows, 'best_q'):.3f} | {mean(rows, 'convergence'):.1f} | {mean(rows, 'test'):.3f} | "
            f"{mean(rows, 'test_perturbed_050'):.3f} | {mean(rows, 'noise_050'):.3f} | {mean(rows, 'seconds'):.2f} |"
        )
    out.append("")
    for objective in objectives:
        rows = {m: g for (o, m), g in groups.items() if o == objective}
        best_q = max(rows, key=lambda m: mean(rows[m], "best_q"))
        def per_iteration(m):
            return mean(rows[m], "seconds") / mean(rows[m], "iterations")

        fastest = min(rows, key=per_iteration)
        quickest = min(rows, key=lambda m: mean(rows[m], "convergence"))
        best_test = best_of(rows, key=lambda m: mean(rows[m], "test"))
        robust = best_of(rows, key=lambda m: mean(rows[m], "noise_050"))
        within = [
            m for m in rows if mean(rows[m], "best_q") >= mean(rows[best_q], "best_q") - 0.5
        ]
        out += [
            f"**{objective}.** The highest Q: `{best_q}` ({mean(rows[best_q], 'best_q'):.3f}); within 0.5 nats of it: "
            f"{', '.join(f'`{m}`' for m in sorted(within))}. Fewest iterations to 99 % of its own best improvement: "
            f"`{quickest}`. Cheapest per iteration: `{fastest}` ({per_iteration(fastest):.3f} s). Best test {metric}: "
            f"`{best_test}` ({mean(rows[best_test], 'test'):.3f}); best under σ = 0.5 input noise: `{robust}` "
            f"({mean(rows[robust], 'noise_050'):.3f}).",
            "",
        ]
    return groups


def advice(groups):
    """Plain-word advice from the full tables of both experiments. Each claim is checked against
    the numbers before it is written, so a rerun that changes the picture fails here instead of
    rendering a sentence the tables no longer support."""
    out = ["## Which method, when", ""]
    runs = [len(rows) for g in groups.values() for rows in g.values()]
    if set(groups) != {"synthetic", "mnist"} or min(runs) < 5:
        return out + ["This section reads the full tables of both experiments (5 runs each); these results are partial.", ""]
    syn, mn = groups["synthetic"], groups["mnist"]

    def q(g, o, m):
        return mean(g[(o, m)], "best_q")

    def secs(g, o, m):
        return mean(g[(o, m)], "seconds")

    def err(g, o, m, key="test"):
        return mean(g[(o, m)], key)

    def top(g, o, key="best_q", best=max):
        # the relaxed structure selects a larger family (gates besides the precisions): not a rival in Q
        return best((m for (o_, m) in g if o_ == o and m != "relaxed"), key=lambda m: mean(g[(o, m)], key))

    # 1. a model whose inner fit reaches its optimum
    assert top(syn, "cv") == "hoag" and top(syn, "elbo") == "hoag"
    unrolled = [m for m in ("rmad", "drmad", "truncated") if ("cv", m) in syn]
    slowdown = min(secs(syn, o, m) / secs(syn, o, "hoag") for o in ("cv", "elbo") for m in unrolled)
    assert all(q(syn, o, m) <= q(syn, o, "hoag") for o in ("cv", "elbo") for m in unrolled)
    out.append(
        "- **A model whose inner fit reaches its optimum** (linear and generalised linear models, the synthetic "
        f"design): **HOAG**. Of the methods that select the precisions alone it reached the highest Q under both validation functions (CV {q(syn, 'cv', 'hoag'):.2f}, "
        f"ELBO {q(syn, 'elbo', 'hoag'):.2f}) in {secs(syn, 'cv', 'hoag'):.2f} / {secs(syn, 'elbo', 'hoag'):.2f} s per run; "
        f"`ift-cg` is the same hypergradient with a fixed tolerance and comes close (CV {q(syn, 'cv', 'ift-cg'):.2f}). "
        f"The unrolled methods (RMAD, DrMAD, truncated) cost at least {slowdown:.0f}× as much per run and never "
        "reached a higher Q: use them when the inner optimiser's own settings are hyperparameters, or when the inner "
        "fit is meant to stop early."
    )
    # 2. the ELBO makes the one-step methods exact
    same = {round(q(syn, "elbo", m), 9) for m in ("greedy", "ift-cg", "ift-neumann")}
    assert len(same) == 1
    out.append(
        "- **The ELBO with an inner fit at its optimum**: `L = −Q`, so `∂Q/∂θ = 0` and greedy, `ift-cg` and "
        f"`ift-neumann` are one method — identical best Q ({q(syn, 'elbo', 'greedy'):.3f}) in every run. Take the "
        "cheapest (greedy)."
    )
    # 3. greedy under CV
    greedy_sd, hoag_sd = sd(syn[("cv", "greedy")], "best_q"), sd(syn[("cv", "hoag")], "best_q")
    assert greedy_sd > 5 * hoag_sd
    out.append(
        f"- **Not greedy under CV.** Its one-step look-ahead ignores how the fit moves later: best Q "
        f"{q(syn, 'cv', 'greedy'):.1f} ± {greedy_sd:.1f} on the synthetic design against HOAG's "
        f"{q(syn, 'cv', 'hoag'):.1f} ± {hoag_sd:.1f}."
    )
    # 4. a neural network
    acc = {m: err(mn, "cv", m) for (o, m) in mn if o == "cv"}
    best_acc = top(mn, "cv", "test")
    assert best_acc == top(mn, "cv", "test_perturbed_050") == top(mn, "cv", "noise_050")
    best_q = top(mn, "cv")
    assert best_q in ("hoag", "ift-cg") and q(mn, "cv", "drmad") < q(mn, "cv", best_q)
    runner_up = sorted(acc, key=acc.get)[-2]
    out.append(
        f"- **A neural network** (MNIST, inner fit never at its optimum): select by **CV**. The hyperparameters "
        f"`{best_acc}` chose gave the best test accuracy ({acc[best_acc]:.3f} ± {sd(mn[('cv', best_acc)], 'test'):.3f}), "
        f"and the best under perturbed weights and under input noise, at {secs(mn, 'cv', best_acc):.0f} s per run; "
        f"`{runner_up}`'s came next ({acc[runner_up]:.3f}, {secs(mn, 'cv', runner_up):.0f} s). The implicit methods "
        f"reached the highest Q (`{best_q}` {q(mn, 'cv', best_q):.0f}), but each method's Q is measured at its own "
        f"inner iterate and DrMAD's SGD trails the L-BFGS fits (Q {q(mn, 'cv', 'drmad'):.0f}): compare methods with "
        "different inner optimisers by test error, not by Q. With two hyperparameters random search is a fair, cheap "
        f"baseline (accuracy {acc['random']:.3f} at {secs(mn, 'cv', 'random'):.0f} s per run)."
    )
    # 5. the mean-field ELBO of a network rewards switching it off
    elbo_rows = [r for (o, _), rows in mn.items() if o == "elbo" for r in rows if not r.get("failed")]
    collapsed = [r for r in elbo_rows if float(r["test"]) <= 0.11]
    alive = [r for r in elbo_rows if float(r["test"]) > 0.11]
    assert collapsed and mean(collapsed, "best_q") > mean(alive, "best_q")
    assert all(err(mn, "elbo", m) < acc[m] for (o, m) in mn if o == "elbo")
    out.append(
        "- **Not the mean-field ELBO for a network's priors.** Every method selected worse hyperparameters by the "
        f"ELBO than by CV, and in {len(collapsed)} of {len(elbo_rows)} runs the selected priors switched the network "
        f"off (test accuracy ≤ 0.11, chance is 0.1) — and those runs had the highest ELBOs (mean "
        f"{mean(collapsed, 'best_q'):.0f} against {mean(alive, 'best_q'):.0f}). A diagonal Gaussian posterior pays a KL "
        "price for every weight it moves away from the prior, and with a short inner fit that price outweighs the fit "
        "the weights buy; maximising the ELBO over the prior then favours a tight prior and weights returned to it, "
        "a dead network (over-pruning; Trippe & Turner, 2018). Use CV for a network's priors; the ELBO remains sound "
        "where the mean-field family holds the posterior well (the synthetic design)."
    )
    # 6. the Laplace evidence of a network, K-FAC curvature
    if any(o == "laplace" for o, _ in mn):
        lap = {m: rows for (o, m), rows in mn.items() if o == "laplace"}
        lap_runs = [r for rows in lap.values() for r in rows if not r.get("failed")]
        lap_collapsed = [r for r in lap_runs if r.get("collapsed") == "True"]
        best_lap = max(lap, key=lambda m: mean(lap[m], "test"))
        short = {m: sum(int(r["iterations"]) < 25 for r in rows) for m, rows in lap.items()}
        assert not lap_collapsed and best_lap == "hoag" and short["hoag"] == 0 and short["random"] == 0
        assert err(mn, "laplace", "hoag") < max(acc.values()) and err(mn, "laplace", "hoag") > max(
            err(mn, "elbo", m) for (o, m) in mn if o == "elbo")
        stopped = sum(short.values())
        fixed = [m for m in lap if m not in ("hoag", "random")]
        out.append(
            "- **The Laplace evidence of a network (K-FAC curvature): a sound criterion, driven by HOAG.** None of its "
            f"{len(lap_runs)} runs switched the network off, where the mean-field ELBO's did; HOAG's selections by it "
            f"tested at {err(mn, 'laplace', 'hoag'):.3f} ± {sd(mn[('laplace', 'hoag')], 'test'):.3f} "
            f"({secs(mn, 'laplace', 'hoag'):.0f} s per run), below CV's best ({max(acc.values()):.3f}) and far above the "
            f"ELBO's. The fixed-rate methods ({', '.join(f'`{m}`' for m in sorted(fixed))}) met a non-finite step and "
            f"stopped early in {stopped} of {5 * len(fixed)} runs: the evidence's gradient in log α is of the order of "
            "N, so a rate that stayed inside the box for three calibration iterations later threw a precision out by "
            "tens of decades (the curvature then has a zero eigenvalue and the evidence is −∞). HOAG rejects a step that "
            "lowers Q and shrinks the next, and random search needs no rate: every run of both finished its 25 iterations."
        )
    # 8. the hypernetwork and the relaxed structure
    if ("cv", "hypernetwork") in syn and ("cv", "relaxed") in syn:
        gap = max(abs(q(syn, o, "hypernetwork") - q(syn, o, "ift-cg")) for o in ("cv", "elbo"))
        cost = min(secs(syn, o, "hypernetwork") / secs(syn, o, "ift-cg") for o in ("cv", "elbo"))
        assert gap < 0.01 and cost > 2
        assert all(q(syn, o, "relaxed") > q(syn, o, top(syn, o)) for o in ("cv", "elbo"))
        out.append(
            "- **The hypernetwork is the implicit hypergradient at a higher price.** At the same calibrated rate it "
            f"followed `ift-cg`'s path (best Q within {gap:.3f} under both validation functions: the best response of this "
            f"linear model is close to affine over ±σ), at {cost:.0f}× or more of its time per run, since every step trains "
            "a network around the new h. Its worth is the network itself: one trained network answers for a neighbourhood "
            "of h (`num_steps=0`, stale outside it), where the implicit methods solve the inner problem again at every h."
        )
        out.append(
            "- **Structure beside the precisions: the relaxed gates.** Selecting a gate per feature with the precisions "
            "(`select_structure`, 10 iterations at each of four temperatures and 10 for the hard structure) gave the "
            f"highest Q of the table under both validation functions (CV {q(syn, 'cv', 'relaxed'):.2f}, ELBO "
            f"{q(syn, 'elbo', 'relaxed'):.2f}, against {q(syn, 'cv', top(syn, 'cv')):.2f} and "
            f"{q(syn, 'elbo', top(syn, 'elbo')):.2f} for the best precisions alone), with test RMSE "
            f"{err(syn, 'cv', 'relaxed'):.3f} / {err(syn, 'elbo', 'relaxed'):.3f}, at {secs(syn, 'cv', 'relaxed'):.0f} / "
            f"{secs(syn, 'elbo', 'relaxed'):.0f} s per run. A switched-off feature is a precision at infinity, which a "
            "gradient step on log α reaches only slowly; the gate gets there in one read-out."
        )
    # 7. test error barely separates the methods on the synthetic design
    spread = {o: max(err(syn, o, m) for (o_, m) in syn if o_ == o) - min(err(syn, o, m) for (o_, m) in syn if o_ == o) for o in ("cv", "elbo")}
    level = statistics.mean(mean(rows, "test") for rows in syn.values())
    assert max(spread.values()) < 0.05 * level
    rise = [mean(rows, "noise_050") - mean(rows, "noise_000") for rows in syn.values()]
    assert min(rise) > 0
    out.append(
        f"- **On the synthetic design the methods differ in Q and cost more than in test RMSE**: their mean RMSEs lie "
        f"within {spread['cv']:.3f} (CV) and {spread['elbo']:.3f} (ELBO) of each other, at an RMSE of {level:.2f}; noise "
        f"of σ = 0.5 on the training inputs raises every method's RMSE, by {min(rise):.3f} to {max(rise):.3f}."
    )
    return out + [""]


def main(argv=None):
    parser = argparse.ArgumentParser(description="render the experiments' tables and figures")
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--output-dir", default=HERE)
    args = parser.parse_args(argv)
    figures = os.path.join(args.output_dir, "figures")
    os.makedirs(figures, exist_ok=True)
    experiments = [e for e in ("synthetic", "mnist") if os.path.exists(os.path.join(args.results, f"{e}.csv"))]
    out = [
        "# The seed's experiments: which hyperparameter method, when",
        "",
        f"Rendered by `python tutorials/experiments.py` on {time.strftime('%Y-%m-%d')} from the committed results in "
        "`benchmarks/results/` (each `.md` there names the command, commit and machine that produced it, and every "
        "deviation from the protocol). Every number below is read from those files.",
        "",
    ]
    groups = {experiment: render(experiment, args.results, figures, out) for experiment in experiments}
    out += advice(groups)
    path = os.path.join(args.output_dir, "experiments.md")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
