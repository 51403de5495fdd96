"""Loss terms: small objects the training loop sums.

A term has a ``name`` (the key it is logged under), a ``weight`` and ``__call__(outputs, batch)``
returning a scalar tensor, or None when it has nothing to add for that batch. The loop adds
``weight * value`` over its list of terms, in list order, and calls ``backward`` once. ``outputs``
is what the caller's forward step produced (an object whose attributes the terms read), ``batch``
the micro-batch (:class:`Batch`). A term with ``logged = False`` adds to the loss without a column
of its own; a term with an ``end_step(row)`` method is told the step's logged means.

The pure functions below are the losses' math, usable on their own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F

from trimkit.errors import TrimkitError
from trimkit.train.config import TrainConfig

__all__ = ["LossTerm", "Batch", "cost_loss", "distill_loss", "logit_penalty", "hidden_mse", "TaskLoss",
           "CrossEntropy", "Distillation", "AnswerDistillation", "answer_positions",
           "CostLoss", "LogitPenalty", "LagrangeMultiplier", "smarttrim_terms"]


class LossTerm(Protocol):
    name: str
    weight: float

    def __call__(self, outputs: Any, batch: "Batch") -> torch.Tensor | None: ...


@dataclass
class Batch:
    """One micro-batch: the model's inputs, the labels (None for unlabelled tasks), other per-row
    targets some terms read (``extra``), and the step's target ratio (set by the loop)."""

    inputs: dict
    labels: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    target: float | None = None

    @property
    def labelled(self) -> dict:
        """The inputs with ``labels`` added (what task adapters' losses read)."""
        return {**self.inputs, "labels": self.labels} if self.labels is not None else self.inputs


# ----------------------------------------------------------------------------------------------
# The math
# ----------------------------------------------------------------------------------------------
def cost_loss(ratio: torch.Tensor, target: float, kind: str = "square") -> torch.Tensor:
    """``(r - t)^2`` or, for ``above``, ``max(r - t, 0)^2``."""
    gap = ratio - target
    if kind == "above":
        gap = gap.clamp_min(0.0)
    return gap * gap


def logit_penalty(logits: list[torch.Tensor], margin: float) -> torch.Tensor | None:
    """``mean(max(|z| - margin, 0)^2)`` over every keep-logit ``z``; None when there are none."""
    flat = [z.float().reshape(-1) for z in logits if z.numel()]
    if not flat:
        return None
    excess = (torch.cat(flat).abs() - margin).clamp_min(0.0)
    return (excess * excess).mean()


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, rows = every leading position."""
    if student.shape != teacher.shape:
        raise TrimkitError(f"student logits {tuple(student.shape)} and teacher logits "
                           f"{tuple(teacher.shape)} differ in shape")
    s = student.float().reshape(-1, student.shape[-1]) / temperature
    t = teacher.float().reshape(-1, teacher.shape[-1]) / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return kl * temperature * temperature


def hidden_mse(student: dict, teacher: dict, masks: dict) -> torch.Tensor | None:
    """Mean over the paths both dicts hold (``[B, T, D]`` tensors of one shape) of the squared error
    averaged over features, then over the tokens of ``masks[path]`` (``[B, T]``, all when absent);
    None when no path matches."""
    total, count = None, 0
    for path, s in student.items():
        t = teacher.get(path)
        if t is None or t.shape != s.shape or s.dim() != 3:
            continue
        err = (s.float() - t.float()).pow(2).mean(-1)
        mask = masks.get(path)
        if isinstance(mask, torch.Tensor) and mask.shape == err.shape:
            value = (err * mask).sum() / mask.sum().clamp_min(1e-6)
        else:
            value = err.mean()
        total = value if total is None else total + value
        count += 1
    return None if total is None else total / count


# ----------------------------------------------------------------------------------------------
# Terms
# ----------------------------------------------------------------------------------------------
@dataclass
class TaskLoss:
    """The task adapter's loss on the trimmed forward (``outputs.student``), plus `full_weight` times
    the same on the full-capacity forward (``outputs.full()``) when that weight is not 0; both are
    logged together under ``task``."""

    task: Any
    full_weight: float = 0.0
    weight: float = 1.0
    name: str = "task"

    def __call__(self, outputs, batch: Batch) -> torch.Tensor:
        value = self.task.loss(outputs.student, batch.labelled)
        if self.full_weight:
            value = value + self.full_weight * self.task.loss(outputs.full(), batch.labelled)
        return value


@dataclass
class CrossEntropy:
    """Cross-entropy of ``logits(outputs.student)`` (float) against the labels."""

    weight: float = 1.0
    label_smoothing: float = 0.0
    logits: Callable[[Any], torch.Tensor] = lambda out: out.logits.float()
    name: str = "task"

    def __call__(self, outputs, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(outputs.student), batch.labels, label_smoothing=self.label_smoothing)


@dataclass
class Distillation:
    """:func:`distill_loss` of ``logits(outputs.student)`` against ``outputs.teacher_logits()``, plus
    `hidden_weight` times :func:`hidden_mse` of ``outputs.hidden()`` (student, teacher, masks) when
    that weight is not 0 and some stream matches."""

    weight: float = 1.0
    temperature: float = 1.0
    logits: Callable[[Any], torch.Tensor] = lambda out: out.logits
    hidden_weight: float = 0.0
    name: str = "distill"

    def __call__(self, outputs, batch: Batch) -> torch.Tensor:
        value = distill_loss(self.logits(outputs.student), outputs.teacher_logits(), self.temperature)
        if self.hidden_weight:
            mse = hidden_mse(*outputs.hidden())
            if mse is not None:
                value = value + self.hidden_weight * mse
        return value


def answer_positions(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``[B, T]`` bool: the positions whose next-token logits predict a labelled token (``labels[:, t + 1]``
    not `ignore_index`); the last position predicts nothing."""
    where = torch.zeros_like(labels, dtype=torch.bool)
    where[:, :-1] = labels[:, 1:] != ignore_index
    return where


@dataclass
class AnswerDistillation(Distillation):
    """:class:`Distillation` of token logits ``[B, T, V]`` at the positions that predict a labelled token
    only (a decoder's answer tokens, :func:`answer_positions`); None for a batch without any."""

    def __call__(self, outputs, batch: Batch) -> torch.Tensor | None:
        where = answer_positions(batch.labels).to(batch.labels.device)
        if not bool(where.any()):
            return None
        student, teacher = self.logits(outputs.student), outputs.teacher_logits()
        value = distill_loss(student[where], teacher[where], self.temperature)
        if self.hidden_weight:
            mse = hidden_mse(*outputs.hidden())
            if mse is not None:
                value = value + self.hidden_weight * mse
        return value


@dataclass
class CostLoss:
    """:func:`cost_loss` of the expected-FLOPs ratio ``outputs.ratio`` against the step's target."""

    weight: float = 10.0
    kind: str = "square"
    name: str = "cost"

    def __call__(self, outputs, batch: Batch) -> torch.Tensor:
        return cost_loss(outputs.ratio, batch.target, self.kind)


@dataclass
class LogitPenalty:
    """:func:`logit_penalty` of ``outputs.keep_logits`` (None when no trimmer gave any)."""

    weight: float
    margin: float = 4.0
    name: str = "logit"

    def __call__(self, outputs, batch: Batch) -> torch.Tensor | None:
        return logit_penalty(outputs.keep_logits, self.margin)


@dataclass
class LagrangeMultiplier:
    """``lambda * (r - t)``, with ``lambda`` (the weight, from 0) moved by ``lr * (mean r - t)`` at the
    end of every step and logged as ``lambda``; nothing is added while it is 0."""

    lr: float
    weight: float = 0.0
    name: str = "lagrange"
    logged: bool = False

    def __call__(self, outputs, batch: Batch) -> torch.Tensor | None:
        return (outputs.ratio - batch.target) if self.weight else None

    def end_step(self, row: dict) -> None:
        self.weight = self.weight + self.lr * (row["ratio"] - row["target"])
        row["lambda"] = self.weight


def smarttrim_terms(config: TrainConfig, task, *, self_teacher: bool = True, dual: float = 0.0) -> list:
    """The loss terms of SmartTrim training with `config`, in the order they are summed (a new term:
    its class above, its weight in `TrainConfig`, one line here). self_teacher: the model with its
    trimmers off is the teacher (the full-capacity task loss needs it); dual: the multiplier's
    value (from a resumed history)."""
    full = config.full_task if self_teacher and config.full_task > 0 and not config.freeze_backbone else 0.0
    terms = [TaskLoss(task, full_weight=full),
             (AnswerDistillation if task.kind == "lm" else Distillation)(
                 config.alpha, config.temperature, logits=task.logits, hidden_weight=config.hidden_weight),
             CostLoss(config.beta, config.cost)]
    if config.logit_penalty:
        terms.append(LogitPenalty(config.logit_penalty, config.logit_margin))
    if config.dual_lr > 0:
        terms.append(LagrangeMultiplier(config.dual_lr, weight=dual))
    return terms
