"""The training loop: micro-batches, a forward, a list of loss terms summed into one backward, then
clipping, the optimizer and an optional learning-rate schedule.

Everything that differs between trainings is a parameter: what a forward computes (``forward``),
the terms, the optimizer (its parameter groups), the schedule, what runs before each step. SmartTrim
training (:func:`trimkit.train.train`), the bench's fine-tuning of baselines and the bench's base
training all run :func:`run_loop`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Mapping, Sequence

import torch
from torch import nn

from trimkit.data import collate
from trimkit.errors import TrimkitError
from trimkit.train.losses import Batch

__all__ = ["Loop", "run_loop", "SeededBatches", "LoadedBatches", "weighted_sum", "finite", "describe", "NonFiniteLoss"]


class _Exhausted(Exception):
    """The batch source ran out."""


class NonFiniteLoss(TrimkitError):
    """The loss (or a term) of a step is not finite; ``step`` is the 0-based step."""

    def __init__(self, step: int, values: Mapping[str, torch.Tensor]):
        self.step = step
        super().__init__(f"loss is not finite at step {step + 1} ({describe(values)})")


def finite(values: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in values.values())


def describe(values: Mapping[str, torch.Tensor]) -> str:
    return ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in values.items())


def weighted_sum(terms: Sequence, values: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``sum(term.weight * value)`` in list order, skipping None values."""
    total = None
    for term, value in zip(terms, values):
        if value is None:
            continue
        part = value if total is None and term.weight == 1.0 else term.weight * value
        total = part if total is None else total + part
    if total is None:
        raise TrimkitError("no loss term gave a value")
    return total


@dataclass
class Loop:
    """What one training run needs.

    model / optimizer: trained in place. batch: ``batch(m) -> Batch`` of micro-batch ``m`` (called
    in order). forward: ``forward(model, batch) -> outputs`` (what the terms read; ``outputs.logged``,
    a dict of tensors, is logged after the terms). terms: the loss terms, summed in order.
    grad_accum: micro-batches per step (each loss is divided by it). clip: ``(parameters, max_norm)``
    or None. schedule: stepped after the optimizer. before_step: ``before_step(step) -> dict`` sets
    up a step (e.g. Gumbel temperature) and returns values for the row (``target`` is also handed to
    the terms). check_finite: raise :class:`NonFiniteLoss` before a non-finite backward.
    columns: logged keys every row starts with, in that order (0 until a micro-batch logs them).
    context: ``context(m) -> context manager`` around the forward and loss of micro-batch ``m``
    (precision, random draws). no_sync: ``no_sync() -> context manager`` around the backward of
    every micro-batch but a step's last (DDP's gradient synchronisation). scaler: a
    ``torch.amp.GradScaler`` (float16 loss scaling). reduce: ``reduce(sums) -> sums`` turns the
    step's logged means into those of the whole batch (several processes), before the terms'
    ``end_step``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[int], Batch]
    forward: Callable[[nn.Module, Batch], Any]
    terms: Sequence = ()
    grad_accum: int = 1
    clip: tuple[Iterable[torch.Tensor], float] | None = None
    schedule: Any = None
    before_step: Callable[[int], dict] | None = None
    check_finite: bool = False
    columns: Sequence[str] = field(default_factory=tuple)
    context: Callable[[int], ContextManager] | None = None
    no_sync: Callable[[], ContextManager] | None = None
    scaler: Any = None
    reduce: Callable[[dict], dict] | None = None

    def _micro(self, step: int, m: int, plan: dict, sums: dict, last: bool = True) -> None:
        try:
            batch = self.batch(m)
        except StopIteration:
            raise _Exhausted from None
        batch.target = plan.get("target")
        with self.context(m) if self.context is not None else contextlib.nullcontext():
            outputs = self.forward(self.model, batch)
            values = [term(outputs, batch) for term in self.terms]
            loss = weighted_sum(self.terms, values)
        parts = {t.name: v for t, v in zip(self.terms, values) if v is not None and getattr(t, "logged", True)}
        if self.check_finite and not finite({"loss": loss, **parts}):
            raise NonFiniteLoss(step, {"loss": loss, **parts})
        scaled = loss / self.grad_accum
        with self.no_sync() if self.no_sync is not None and not last else contextlib.nullcontext():
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        for key, value in (("loss", loss), *parts.items(), *getattr(outputs, "logged", {}).items()):
            sums[key] = sums.get(key, 0.0) + float(value.detach()) / self.grad_accum

    def step(self, step: int) -> dict:
        """Run optimizer step `step` (0-based); its row: the means of the loss, of every logged term
        and of ``outputs.logged`` over the micro-batches, then the values ``before_step`` gave."""
        plan = self.before_step(step) if self.before_step is not None else {}
        sums = dict.fromkeys(("loss", *self.columns), 0.0)
        for micro in range(self.grad_accum):
            self._micro(step, step * self.grad_accum + micro, plan, sums, last=micro + 1 == self.grad_accum)
        if self.reduce is not None:
            sums = self.reduce(sums)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip is not None and self.clip[1] > 0:
            torch.nn.utils.clip_grad_norm_(self.clip[0], self.clip[1])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, **sums, **plan}
        for term in self.terms:
            if hasattr(term, "end_step"):
                term.end_step(row)
        return row


def run_loop(loop: Loop, steps: int, *, start: int = 0,
             after_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Steps ``start .. steps - 1`` of `loop`; one row per step. ``after_step(step, row)`` runs after
    each (logging, measurements, checkpoints). A batch source that raises StopIteration (a finite
    iterator) ends the run early."""
    rows = []
    for step in range(start, steps):
        try:
            row = loop.step(step)
        except _Exhausted:
            break
        rows.append(row)
        if after_step is not None:
            after_step(step, row)
    return rows


class SeededBatches:
    """Micro-batch ``m`` of a dataset (collated items), drawn from a per-epoch permutation seeded by
    (seed, epoch): the data order is a function of (seed, m), so a resumed run reads the same.
    shard: ``shard(rows) -> rows``, this process's part of every batch (several processes)."""

    def __init__(self, dataset, batch_size: int, seed: int, shard: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.dataset, self.batch_size, self.seed, self.shard = dataset, batch_size, seed, shard
        self.per_epoch = max(1, len(dataset) // batch_size)
        self._perm: tuple[int, torch.Tensor] | None = None
        self._cache: dict[int, dict] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.dataset), generator=gen))
        return self._perm[1]

    def _item(self, index: int) -> dict:
        item = self._cache.get(index)
        if item is None:
            item = self._cache[index] = self.dataset[index]
        return item

    def rows(self, m: int) -> torch.Tensor:
        """The dataset indices of the whole micro-batch ``m`` (every process's rows)."""
        epoch, j = divmod(m, self.per_epoch)
        perm = self._permutation(epoch)
        rows = perm[j * self.batch_size:(j + 1) * self.batch_size]
        if len(rows) < self.batch_size:  # a data set smaller than one batch: wrap around
            rows = torch.arange(j * self.batch_size, (j + 1) * self.batch_size) % len(self.dataset)
        return rows

    def local_rows(self, m: int) -> torch.Tensor:
        """This process's rows of micro-batch ``m``."""
        rows = self.rows(m)
        return self.shard(rows) if self.shard is not None else rows

    def whole(self, m: int) -> dict:
        """Micro-batch ``m`` with every process's rows."""
        return collate([self._item(int(i)) for i in self.rows(m)])

    def __call__(self, m: int) -> dict:
        return collate([self._item(int(i)) for i in self.local_rows(m)])


class _Plan(torch.utils.data.Sampler):
    """The row lists of micro-batches ``start, start + 1, ...`` (endless)."""

    def __init__(self, batches: SeededBatches, start: int):
        self.batches, self.start = batches, start

    def __iter__(self):
        m = self.start
        while True:
            yield [int(i) for i in self.batches.local_rows(m)]
            m += 1


class LoadedBatches:
    """:class:`SeededBatches` read by a ``DataLoader`` with `workers` worker processes (and pinned
    memory for a GPU): the same batches, collated ahead of the step that uses them."""

    def __init__(self, batches: SeededBatches, workers: int, pin_memory: bool = False):
        self.batches, self.workers, self.pin_memory = batches, workers, pin_memory
        self.dataset = batches.dataset
        self._iter, self._next = None, -1

    def __call__(self, m: int) -> dict:
        if self._iter is None or m != self._next:
            own = torch.Generator().manual_seed(self.batches.seed * 1_000_003 + m)  # leaves the global state alone
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=_Plan(self.batches, m), collate_fn=collate,
                                                 num_workers=self.workers, pin_memory=self.pin_memory, generator=own)
            self.close()
            self._iter = iter(loader)
        self._next = m + 1
        return next(self._iter)

    def whole(self, m: int) -> dict:
        return self.batches.whole(m)

    def close(self) -> None:
        """Stop the worker processes (the loader's iterator shuts them down when it is dropped)."""
        self._iter = None
