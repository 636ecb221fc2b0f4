"""Shared by the benchmark scripts: where a table was made, and writing it."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time

import pyro
import torch


def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, pyro {pyro.__version__}"
    if device.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(device)}"
    return desc


def commit():
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:  # noqa: BLE001 - outside a checkout
        return "unknown"


def emit(lines, output=None):
    """Prints a Markdown table and writes it to ``output`` when given."""
    text = "\n".join(lines)
    print(text)
    if output:
        with open(output, "w") as f:
            f.write(text)


def sync(device):
    """Waits for a GPU's queued work, so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, repeats, device):
    """The median wall time of ``fn()`` over ``repeats`` calls after one warm-up, the device synchronised."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)
