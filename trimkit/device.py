"""Where a model runs and in which precision: device and dtype names checked with one-line errors,
placement of a model with its trimmers kept in float32, and the peak memory of a step.

Names: devices ``cpu``, ``cuda``, ``cuda:N``, ``mps``; dtypes ``float32``, ``bfloat16``, ``float16``.
"""
from __future__ import annotations

import contextlib
import functools
import resource
import sys
from typing import Iterator

import torch
from torch import nn

from trimkit.errors import ConfigError

__all__ = ["DTYPES", "resolve_device", "resolve_dtype", "dtype_name", "place", "keep_float32", "autocast",
           "reset_peak_memory", "peak_memory", "float32_logits"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRIMMER_ROLE = "trimmer"


def _cuda_device(name: str) -> torch.device:
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} is not available: this torch build sees no CUDA GPU "
                          f"(torch {torch.__version__}); use --device cpu")
    device = torch.device(name)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"device {name!r} is not available: {count} CUDA GPU(s) visible (cuda:0..cuda:{count - 1})")
    return device


def resolve_device(name: str | torch.device | None) -> torch.device:
    """A checked :class:`torch.device` from ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (None: cpu)."""
    if name is None:
        return torch.device("cpu")
    if isinstance(name, torch.device):
        name = str(name)
    text = str(name).strip().lower()
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()) or (index and kind != "cuda"):
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps")
    if kind == "cuda":
        return _cuda_device(text)
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("device 'mps' is not available: no Apple GPU (Metal) on this machine; use --device cpu")
    return torch.device(kind)


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """A :class:`torch.dtype` from ``float32``, ``bfloat16`` or ``float16`` (None: float32)."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ConfigError(f"unsupported dtype {name}; use one of {', '.join(DTYPES)}")
        return name
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    key = aliases.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def _is_trimmer(module: nn.Module) -> bool:
    return getattr(module, "trimkit_role", None) in (TRIMMER_ROLE, "inactive")


def keep_float32(model: nn.Module) -> list[nn.Module]:
    """Cast every trimmer module of `model` back to float32 (their logits decide what is kept, and
    bfloat16's 8-bit mantissa moves thresholds); the trimmers."""
    trimmers = [m for m in model.modules() if _is_trimmer(m)]
    for m in trimmers:
        m.float()
    return trimmers


def place(model: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
          *, floating_only: bool = True) -> nn.Module:
    """Move `model` to `device` and cast its floating-point weights to `dtype`, trimmers kept in float32
    (in place; returns `model`)."""
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    model.to(device=device)
    if dtype != torch.float32:
        model.to(dtype=dtype)
        keep_float32(model)
    return model


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """``torch.autocast`` to `dtype` on `device`'s kind; nothing for float32."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only: the CPU peak is the process's high-water mark)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """``(MiB, source)``: on CUDA ``torch.cuda.max_memory_allocated`` since the last reset (tensors
    only); elsewhere the process's peak resident set size from ``getrusage`` (``ru_maxrss``: the whole
    process, and it never goes down, so it is the peak so far, not per step)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return rss * scale / 2**20, "ru_maxrss"


def float32_logits(method):
    """Decorate a trimmer's scoring method: tensor arguments are cast to the dtype of the trimmer's
    weights (float32) and autocast is off inside, so keep-logits stay float32 in a bfloat16 or float16
    model. Free when nothing needs casting."""
    @functools.wraps(method)
    def run(self, *args):
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if first is None or (first.dtype is torch.float32 and not torch.is_autocast_enabled(first.device.type)):
            return method(self, *args)  # the common case: nothing to cast
        weight = next(self.parameters())
        if first.dtype == weight.dtype and not torch.is_autocast_enabled(first.device.type):
            return method(self, *args)
        cast = tuple(a.to(weight.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        with torch.autocast(first.device.type, enabled=False):
            return method(self, *cast)
    return run
