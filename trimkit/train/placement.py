"""Where one training process runs: its device and precision, its rank among the processes, the
DDP wrapper, float16 loss scaling, gradient checkpointing, and what a training step is wrapped in."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from trimkit.device import autocast, dtype_name, peak_memory, reset_peak_memory, resolve_device, resolve_dtype
from trimkit.errors import ConfigError
from trimkit.train.config import TrainConfig
from trimkit.train.distributed import (Group, RowStableRandom, init_group, no_sync, pad_text, reduce_row,
                                       shard_rows, wrap_ddp)
from trimkit.train.memory import add_lora, checkpoint_layers, layer_paths, merge_lora, site_paths

__all__ = ["Placement", "cast_frozen", "draws_dropout"]


def draws_dropout(model: nn.Module) -> bool:
    """Whether a training forward of `model` may draw dropout masks: an ``nn.Dropout`` with ``p > 0``,
    or a ``*dropout*`` setting above 0 in a Hugging Face config (functional dropout)."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    settings = config.to_dict() if hasattr(config, "to_dict") else {}
    return any("dropout" in str(k) and isinstance(v, (int, float)) and v > 0 for k, v in _flat(settings))


def _flat(settings: dict):
    for key, value in settings.items():
        if isinstance(value, dict):
            yield from _flat(value)
        else:
            yield key, value


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the floating-point parameters that do not train to `dtype` (trained ones stay float32 for
    the optimizer); how many."""
    count = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            count += 1
    return count


@dataclass
class Placement:
    """One process's device, dtype and group, and what it adds to the model and the loop."""

    device: torch.device
    dtype: torch.dtype
    group: Group
    rows: int = 0
    ddp: nn.Module | None = None
    scaler: Any = None
    dropout: bool = True
    undo: list[Callable[[], None]] = field(default_factory=list)

    @classmethod
    def start(cls, config: TrainConfig) -> "Placement":
        """Check the device and dtype, and join the process group (several processes)."""
        device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
        group, device = init_group(device)
        if config.batch_size % group.world:
            raise ConfigError(f"--batch-size {config.batch_size} (the global batch) is not divisible by the "
                              f"{group.world} processes")
        if dtype == torch.float16 and device.type == "mps":
            raise ConfigError("float16 training with loss scaling needs cpu or cuda")
        return cls(device, dtype, group, rows=config.batch_size // group.world)

    @property
    def runner(self) -> nn.Module | None:
        """The DDP wrapper that the trimmed forward runs through (None: one process)."""
        return self.ddp

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        return shard_rows(rows, self.group)

    def add_adapters(self, model: nn.Module, model_map, config: TrainConfig) -> None:
        """LoRA adapters (``trainable = lora``) and gradient checkpointing, before the optimizer."""
        if config.trainable == "lora":
            add_lora(model, model_map, config.lora_rank)
            self.undo.append(lambda: merge_lora(model))
        if config.grad_checkpointing:
            paths = layer_paths(model_map)
            if not paths:
                raise ConfigError("--grad-checkpointing found no located layer to checkpoint")
            self.undo.append(checkpoint_layers(model, paths, site_paths(model_map), recompute=self.random))

    def finish_model(self, model: nn.Module) -> None:
        """After the optimizer chose what trains: move to the device, cast the frozen weights, wrap in DDP
        and set up loss scaling."""
        model.to(self.device)
        self.dropout = draws_dropout(model)
        if self.dtype != torch.float32:
            cast_frozen(model, self.dtype)
        if self.dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.ddp = wrap_ddp(model, self.device, self.group)

    def random(self) -> ContextManager:
        """Random draws of this process's rows taken from the global batch's draw. One process without
        dropout draws exactly that already, and skips the per-op cost of the mode (measured: +22 % per
        step on vilt-vqa-tiny); with dropout the mode stays on, so its masks match several processes'."""
        if not self.group.active and not self.dropout:
            return contextlib.nullcontext()
        return RowStableRandom(self.rows, self.group.rank * self.rows, self.rows * self.group.world)

    def context(self, m: int) -> ContextManager:
        """Around a micro-batch's forward and loss: the precision and the row-stable random draws."""
        stack = contextlib.ExitStack()
        stack.enter_context(autocast(self.device, self.dtype))
        stack.enter_context(self.random())
        return stack

    def precision(self) -> ContextManager:
        """The forward's precision (autocast) outside training steps: measurements and calibration."""
        return autocast(self.device, self.dtype)

    def no_sync(self) -> ContextManager:
        return no_sync(self.ddp)

    def reduce(self, sums: dict) -> dict:
        return reduce_row(sums, self.group)

    def pad(self, batch: dict) -> dict:
        return pad_text(batch, self.group)

    def begin_step(self) -> None:
        reset_peak_memory(self.device)

    def peak(self) -> dict:
        """``{"peak_mib": ...}`` of the step (see :func:`trimkit.device.peak_memory`)."""
        mib, _ = peak_memory(self.device)
        return {"peak_mib": round(mib, 1)}

    def describe(self) -> dict:
        """What the output folder records about the run's placement."""
        return {"dtype": dtype_name(self.dtype), "device": self.device.type, "processes": self.group.world}

    def close(self) -> None:
        """Undo the adapters (LoRA merged into the weights) and the checkpointing wrappers."""
        while self.undo:
            self.undo.pop()()
