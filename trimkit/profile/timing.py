"""Latency: median wall time after warm-up, fixed threads, ``torch.inference_mode``; on CUDA the
device is synchronized before and after each timed forward.

Absolute times depend on the machine; compare models with :func:`compare_latency`,
which interleaves their runs (A, B, A, B, ...) in one process.
"""
from __future__ import annotations

import statistics
import time

import torch

from trimkit.errors import ConfigError
from trimkit.profile.inputs import Inputs
from trimkit.profile.running import eval_mode, fixed_threads, model_name, run_forward

__all__ = ["measure_latency", "compare_latency", "cuda_devices", "synchronize"]


def _check(threads: int, warmup: int, repeats: int) -> None:
    if threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    if warmup < 0:
        raise ConfigError(f"warmup must be 0 or more, got {warmup}")
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")


def cuda_devices(model: torch.nn.Module) -> list[torch.device]:
    """The CUDA devices holding `model`'s parameters (their queued kernels must finish before a clock read)."""
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)


def synchronize(devices: list[torch.device]) -> None:
    for device in devices:
        torch.cuda.synchronize(device)


def _timed(model: torch.nn.Module, inputs: Inputs, name: str) -> float:
    """Milliseconds of one forward; on CUDA the clock is read after the device has finished."""
    devices = cuda_devices(model)
    synchronize(devices)
    start = time.perf_counter()
    run_forward(model, inputs, name)
    synchronize(devices)
    return (time.perf_counter() - start) * 1000.0


def measure_latency(model: torch.nn.Module, inputs: Inputs, *, threads: int = 1,
                    warmup: int = 3, repeats: int = 10, name: str | None = None) -> float:
    """Median milliseconds of ``repeats`` forwards after ``warmup`` untimed ones."""
    _check(threads, warmup, repeats)
    name = name or model_name(model)
    with fixed_threads(threads), eval_mode(model), torch.inference_mode():
        for _ in range(warmup):
            run_forward(model, inputs, name)
        times = [_timed(model, inputs, name) for _ in range(repeats)]
    return statistics.median(times)


def compare_latency(model_a: torch.nn.Module, model_b: torch.nn.Module, inputs: Inputs, *,
                    inputs_b: Inputs | None = None, threads: int = 1, warmup: int = 3,
                    repeats: int = 10) -> dict[str, float]:
    """Interleaved medians: ``{"a_ms", "b_ms", "ratio": a_ms / b_ms}`` (ratio > 1: B is faster)."""
    _check(threads, warmup, repeats)
    inputs_b = inputs if inputs_b is None else inputs_b
    name_a, name_b = model_name(model_a), model_name(model_b)
    times_a, times_b = [], []
    with fixed_threads(threads), eval_mode(model_a), eval_mode(model_b), torch.inference_mode():
        for _ in range(warmup):
            run_forward(model_a, inputs, name_a)
            run_forward(model_b, inputs_b, name_b)
        for _ in range(repeats):
            times_a.append(_timed(model_a, inputs, name_a))
            times_b.append(_timed(model_b, inputs_b, name_b))
    a_ms, b_ms = statistics.median(times_a), statistics.median(times_b)
    return {"a_ms": a_ms, "b_ms": b_ms, "ratio": a_ms / b_ms if b_ms > 0 else float("nan")}
