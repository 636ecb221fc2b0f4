"""
Where a problem runs: ``device="auto"`` picks the GPU only where it is faster for this problem.

A GPU pays a launch for every operation; a model's log joint is a few dozen of them, so on a small
problem (a regression on a few hundred rows) the CPU finishes first and on a large one (an MLP on
thousands of images) the GPU does. Rather than guess the crossover from sizes, :func:`choose_device`
times what the inner loops repeat — one gradient of the replayed log joint — on both devices and
takes the faster; below ``min_work`` (rows × latents) it does not ask the GPU at all.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.func import grad

from .problem import Problem
from .util import isolated_params

__all__ = ["choose_device", "gradient_seconds", "place"]


def gradient_seconds(problem, repeats: int = 5) -> float:
    """The median time of one ``∇_θ log p(y, θ | h)`` of ``problem`` at its start (after a warm-up)."""
    g = grad(problem.log_joint)
    cuda = problem.device.type == "cuda"
    times = []
    for i in range(repeats + 2):  # two warm-up calls: a GPU's first ones set up its libraries
        if cuda:
            torch.cuda.synchronize(problem.device)
        start = time.perf_counter()
        g(problem.theta_init, problem.h_init)
        if cuda:
            torch.cuda.synchronize(problem.device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def choose_device(model, *args, model_kwargs=None, hyperparameters=None, min_work: int = 10**6) -> torch.device:
    """
    The faster of the CPU and the (first) GPU for ``model`` on ``args``: the CPU where CUDA is not
    available or the problem is small (rows × latents below ``min_work``), else whichever computes
    a gradient of the log joint faster (:func:`gradient_seconds`). The param store is left as it was.
    """
    cpu = torch.device("cpu")
    if not torch.cuda.is_available():
        return cpu
    with isolated_params():
        on_cpu = Problem(model, *_to(args, cpu), model_kwargs=model_kwargs, hyperparameters=hyperparameters)
        if on_cpu.num_data * on_cpu.theta_dim < min_work:
            return cpu
        gpu = torch.device("cuda", torch.cuda.current_device())
        on_gpu = Problem(model, *_to(args, gpu), model_kwargs=model_kwargs, hyperparameters=hyperparameters)
        return gpu if gradient_seconds(on_gpu) < gradient_seconds(on_cpu) else cpu


def place(device, model, args, model_kwargs=None, hyperparameters=None) -> tuple:
    """The data ``args`` on ``device``: None leaves them where they are, ``"auto"`` moves them to
    :func:`choose_device`'s choice, anything else to that torch device (refused where CUDA is missing)."""
    if device is None:
        return args
    if device == "auto":
        device = choose_device(model, *args, model_kwargs=model_kwargs, hyperparameters=hyperparameters)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: CUDA is not available on this machine")
    return _to(args, device)


def _to(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
