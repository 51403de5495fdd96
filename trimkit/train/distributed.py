"""Multi-process training on ``torch.distributed``: the process group, each rank's shard of a global
batch, randomness that does not depend on the rank, and the batch statistics taken over all ranks.

``--batch-size`` is the global batch: rank ``r`` of ``W`` reads rows ``r*B/W .. (r+1)*B/W`` of every
batch. A run on ``W`` processes then equals a run on one:

* gradients are averaged by DDP and every per-row loss is a mean over equally many rows;
* the expected-FLOPs ratio (the cost loss, the multiplier) is the mean over the global batch
  (:func:`global_mean`: an ``all_reduce`` of the value, the gradient of the local rows);
* text is padded to the global batch's longest row (:func:`pad_text`);
* random draws whose first dimension is the batch (Gumbel noise, dropout) come from the global
  batch's draw, sliced to the rank's rows (:class:`RowStableRandom`), so item ``i`` gets the same
  noise whichever rank runs it, and every rank's random state stays equal to one process's;
* the logged means are averaged over the ranks (:func:`reduce_row`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from trimkit.errors import ConfigError

__all__ = ["Group", "current", "init_group", "shard_rows", "RowStableRandom", "global_mean", "reduce_row", "no_sync",
           "pad_text", "wrap_ddp", "launch", "barrier"]

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Group:
    """This process's place: ``rank`` of ``world`` processes (``local_rank`` on its machine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def current() -> Group:
    """The group of an initialised process group, else of torchrun's environment, else one process."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Group(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_group(device: torch.device) -> tuple[Group, torch.device]:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA) when there is more than
    one process; the group and this rank's device (``cuda`` becomes ``cuda:LOCAL_RANK``)."""
    group = current()
    if not group.active:
        return group, device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", group.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "mps":
        raise ConfigError("multi-process training runs on cpu (gloo) or cuda (nccl), not mps")
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise ConfigError(f"WORLD_SIZE is {group.world} but MASTER_ADDR is not set: start with torchrun "
                              "or trimkit train --nproc N")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return current(), device


def shard_rows(rows: torch.Tensor, group: Group) -> torch.Tensor:
    """Rank ``group.rank``'s equal share of a global batch's row indices."""
    if len(rows) % group.world:
        raise ConfigError(f"the batch size {len(rows)} is not divisible by the {group.world} processes")
    per = len(rows) // group.world
    return rows[group.rank * per:(group.rank + 1) * per]


def barrier(group: Group) -> None:
    if group.active and dist.is_initialized():
        dist.barrier()


def _size(args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    if "size" in kwargs:
        return tuple(kwargs["size"])
    if args and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0])
    if args and all(isinstance(a, int) for a in args):
        return tuple(args)
    return None


class RowStableRandom(TorchFunctionMode):
    """While active, ``torch.rand`` / ``torch.randn`` calls whose first dimension is the local batch
    (``rows``) draw the global batch (``total`` rows) and keep rows ``offset .. offset + rows``;
    ``F.dropout`` in training draws its keep mask that way too. Calls with a ``generator`` are left
    alone. With one process (``rows == total``) the draws equal plain ones, except dropout, whose
    mask then comes from ``torch.rand`` rather than ``bernoulli_`` (same distribution)."""

    def __init__(self, rows: int, offset: int = 0, total: int | None = None):
        super().__init__()
        self.rows, self.offset, self.total = rows, offset, rows if total is None else total

    def _draw(self, func, size: tuple[int, ...], kwargs: dict) -> torch.Tensor:
        kw = {k: v for k, v in kwargs.items() if k != "size"}
        full = func((self.total, *size[1:]), **kw)
        return full[self.offset:self.offset + self.rows]

    def _dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        if p >= 1.0:
            return x * 0.0
        keep = self._draw(torch.rand, tuple(x.shape), {"device": x.device}) >= p
        return x * keep.to(x.dtype) / (1.0 - p)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.rand, torch.randn) and kwargs.get("generator") is None:
            size = _size(args, kwargs)
            if size and size[0] == self.rows:
                return self._draw(func, size, kwargs)
        elif func is F.dropout:
            x = args[0] if args else kwargs["input"]
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training", True)
            if training and p > 0 and x.dim() and x.shape[0] == self.rows:
                return self._dropout(x, float(p))
        return func(*args, **kwargs)


def global_mean(local: torch.Tensor, group: Group) -> torch.Tensor:
    """The mean over all ranks of a 0-d `local` mean (equal rows per rank), as a tensor whose gradient
    is that of `local`: once DDP averages the gradients, a loss of it has the gradient of the same
    loss of the global batch's mean."""
    if not group.active:
        return local
    total = local.detach().clone()
    dist.all_reduce(total)
    return total / group.world + (local - local.detach())


def reduce_row(values: dict[str, float], group: Group) -> dict[str, float]:
    """`values` averaged over the ranks (one ``all_reduce``)."""
    if not group.active or not values:
        return values
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(packed)
    return {k: float(v) / group.world for k, v in zip(keys, packed.tolist())} | \
        {k: values[k] for k in values if k not in keys}


def pad_text(batch: dict, group: Group) -> dict:
    """`batch` with its text columns right-padded with 0 to the longest row of the global batch."""
    keys = [k for k in TEXT_KEYS if k in batch and batch[k].dim() >= 2]
    if not group.active or not keys:
        return batch
    width = torch.tensor([batch[keys[0]].shape[-1]], dtype=torch.long)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    extra = int(width) - batch[keys[0]].shape[-1]
    if extra <= 0:
        return batch
    return {**batch, **{k: F.pad(batch[k], (0, extra)) for k in keys}}


def wrap_ddp(model: torch.nn.Module, device: torch.device, group: Group) -> torch.nn.Module | None:
    """`model` in ``DistributedDataParallel`` (its trainable parameters are synchronised); None for one
    process. Buffers are synchronised once, at the start, not before every forward."""
    if not group.active:
        return None
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


@contextlib.contextmanager
def no_sync(ddp: torch.nn.Module | None) -> Iterator[None]:
    """Accumulate gradients without the all-reduce (micro-batches before the last of a step)."""
    if ddp is None:
        yield
        return
    with ddp.no_sync():
        yield


def launch(nproc: int, argv: list[str], run: Callable[[list[str]], Any] | None = None) -> None:
    """Run ``python -m trimkit.cli ARGV`` on `nproc` local processes through ``torch.distributed.run``."""
    from torch.distributed import run as torchrun

    args = ["--standalone", f"--nproc_per_node={nproc}", "--module", "trimkit.cli", *argv]
    (run or torchrun.main)(args)
