"""
The seed's experiments on a GPU against the CPU: one configuration per data set (``ift-cg`` and
random search, CV and ELBO, one run each), the same code and seed on both devices, run side by
side in one process.

    python benchmarks/bench_experiments.py --device cuda --output benchmarks/results/experiments_gpu.md

``--pool`` and ``--iterations`` shrink the MNIST configuration for a quick look; the defaults
are the protocol's (28 × 28 images, 25 iterations; synthetic 50).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import commit, emit, machine  # noqa: E402

from pyro_evidence.experiments import Mnist, Synthetic, run  # noqa: E402


def timings(setup_of, device, objectives, methods):
    """Seconds of the selection (calibration and evaluation excluded) and best Q per configuration."""
    setup = setup_of(device)
    return {(r.objective, r.method): r for r in run(setup, objectives, methods, runs=1, progress=False)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--pool", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=None, help="MNIST iterations (25)")
    parser.add_argument("--methods", nargs="+", default=["ift-cg", "random"])
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")

    def mnist(dev):
        setup = Mnist(dev, pool=args.pool)
        if args.iterations:
            setup.iterations = args.iterations
        return setup

    cases = {"synthetic": lambda dev: Synthetic(dev), "mnist": mnist}
    lines = [
        "# The seed's experiments: one run per configuration, CPU against " + str(device),
        "",
        f"Command: `python benchmarks/bench_experiments.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Commit: `{commit()}`  ",
        f"Machine: {machine(device)}",
        "",
        "Seconds of one run's selection (the protocol's iterations; calibration of the hyper learning rate and "
        "the test metrics not included); best Q on each device.",
        "",
        "| data | validation | method | CPU seconds | " + device.type + " seconds | speed-up | best Q, CPU | best Q, " + device.type + " |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, setup_of in cases.items():
        cpu = timings(setup_of, "cpu", ("cv", "elbo"), args.methods)
        other = timings(setup_of, args.device, ("cv", "elbo"), args.methods)
        for key, r in cpu.items():
            o = other[key]
            lines.append(
                f"| {name} | {key[0]} | {key[1]} | {r.seconds:.2f} | {o.seconds:.2f} | {r.seconds / o.seconds:.2f}× | "
                f"{r.best_q:.4g} | {o.best_q:.4g} |"
            )
    emit(lines, args.output)


if __name__ == "__main__":
    main()
