"""The two records every loader returns: a `Backbone` and the `TaskAdapter` that reads its outputs.

`TaskAdapter.logits(outputs)` is the tensor compared for equality and used for distillation;
`TaskAdapter.loss(outputs, batch)` is the task loss. Kinds:

- ``classification``: logits ``[B, C]``; ``labels`` are class ids ``[B]`` (cross-entropy) or soft
  scores ``[B, C]`` (binary cross-entropy times C, the VQA convention).
- ``matching``: image-text matching logits ``[B, 2]``; ``labels`` are 0 (no match) / 1 (match).
- ``contrastive``: ``logits_per_image`` ``[B, B]``; the pairs on the diagonal match, no labels needed
  (``softmax``: CLIP's symmetric cross-entropy, ``sigmoid``: SigLIP's pairwise sigmoid loss).
- ``lm``: token logits ``[B, T, V]``; next-token cross-entropy on ``labels`` or, without them, on
  ``input_ids`` (padding and the ids in ``ignore_ids`` are not targets).
- ``features``: the first tensor output; ``labels`` of the same shape (mean squared error) or
  class ids (cross-entropy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from trimkit.backbones.inputs import LABEL_STREAM, row_generator
from trimkit.errors import ConfigError, DataError

__all__ = ["TASK_KINDS", "TaskAdapter", "Backbone", "first_tensor"]

TASK_KINDS = ("classification", "matching", "contrastive", "lm", "features")
IGNORE_INDEX = -100


def _find_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = _find_tensor(item)
        if found is not None:
            return found
    return None


def first_tensor(outputs: Any) -> torch.Tensor:
    """The first tensor in a model output (a tensor, a mapping/ModelOutput or a tuple, searched in order)."""
    found = _find_tensor(outputs)
    if found is None:
        raise DataError(f"no tensor in model output of type {type(outputs).__name__}")
    return found


def _field(outputs: Any, key: str) -> torch.Tensor:
    value = outputs.get(key) if isinstance(outputs, Mapping) else getattr(outputs, key, None)
    if not isinstance(value, torch.Tensor):
        raise DataError(f"model output has no tensor {key!r} (got {type(outputs).__name__})")
    return value


@dataclass(frozen=True)
class TaskAdapter:
    """How to read a model's outputs for its task (see the module docstring for the kinds).

    key: the output field holding the logits; None takes the first tensor output.
    position: when set, logits are ``outputs[key][:, position]`` (one decoder step of token logits).
    num_labels: number of classes (classification, matching).
    contrastive: ``"softmax"`` or ``"sigmoid"`` (contrastive kind only).
    ignore_ids: token ids that are never next-token targets (lm kind: image placeholders, padding).
    """

    kind: str
    key: str | None = "logits"
    position: int | None = None
    num_labels: int | None = None
    contrastive: str = "softmax"
    ignore_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ConfigError(f"unknown task kind {self.kind!r}; known: {', '.join(TASK_KINDS)}")
        if self.contrastive not in ("softmax", "sigmoid"):
            raise ConfigError(f"contrastive loss must be 'softmax' or 'sigmoid', got {self.contrastive!r}")

    def logits(self, outputs: Any) -> torch.Tensor:
        """The tensor compared for equality and used for distillation."""
        value = first_tensor(outputs) if self.key is None else _field(outputs, self.key)
        return value if self.position is None else value[:, self.position]

    def loss(self, outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        """The task loss of `outputs` on `batch` (the model inputs plus ``labels`` where needed)."""
        logits = self.logits(outputs)
        labels = batch.get("labels")
        if self.kind == "contrastive":
            return _contrastive_loss(logits, self.contrastive)
        if self.kind == "lm":
            return _lm_loss(logits, _lm_targets(batch, self.ignore_ids) if labels is None else labels)
        if labels is None:
            raise DataError(f"a {self.kind} loss needs 'labels' in the batch; got keys {sorted(batch)}")
        if self.kind == "features" and labels.is_floating_point():
            return F.mse_loss(logits.float(), labels.to(logits.device, torch.float32))
        return _classification_loss(logits, labels)

    def example_labels(self, batch_size: int, *, seed: int = 0) -> torch.Tensor | None:
        """Deterministic labels for `batch_size` rows (None where the loss needs none)."""
        if self.kind not in ("classification", "matching") or not self.num_labels:
            return None
        return torch.cat([torch.randint(self.num_labels, (1,), generator=row_generator(seed, row, LABEL_STREAM))
                          for row in range(batch_size)])


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    labels = labels.to(logits.device)
    if labels.is_floating_point():
        if labels.shape != logits.shape:
            raise DataError(f"soft labels of shape {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float()) * labels.shape[-1]
    labels = labels.reshape(-1)
    if labels.numel() != logits.shape[0] or logits.dim() != 2:
        raise DataError(f"class labels of shape {tuple(labels.shape)} do not fit logits {tuple(logits.shape)}")
    return F.cross_entropy(logits.float(), labels.long())


def _contrastive_loss(logits: torch.Tensor, how: str) -> torch.Tensor:
    if logits.dim() != 2:
        raise DataError(f"contrastive logits must be [images, texts], got shape {tuple(logits.shape)}")
    logits = logits.float()
    if how == "sigmoid":
        signs = 2 * torch.eye(*logits.shape, device=logits.device) - 1
        return -F.logsigmoid(signs * logits).sum() / logits.shape[0]
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def _lm_targets(batch: Mapping[str, Any], ignore_ids: tuple[int, ...]) -> torch.Tensor:
    ids = batch.get("input_ids")
    if ids is None:
        raise DataError(f"an lm loss needs 'labels' or 'input_ids' in the batch; got keys {sorted(batch)}")
    targets = ids.clone()
    mask = batch.get("attention_mask")
    if mask is not None:
        targets[mask == 0] = IGNORE_INDEX
    for token in ignore_ids:
        targets[ids == token] = IGNORE_INDEX
    return targets


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise DataError(f"lm targets of shape {tuple(targets.shape)} do not fit logits {tuple(logits.shape)}")
    shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(shifted, targets[:, 1:].reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX)


def _model_device(model: torch.nn.Module) -> torch.device | None:
    param = next(model.parameters(), None)
    return None if param is None else param.device


@dataclass
class Backbone:
    """A model ready for trimkit: the module (eval mode), its task adapter and an input maker.

    make_inputs(batch_size, *, text_len=None, image_size=None, seed=0) returns the keyword arguments
    of ``model(**inputs)``. Row i depends only on (seed, i), so a batch of 3 starts with the batch of 1.
    The values are tensors, except ``interpolate_pos_encoding=True`` for models that need the flag
    when `image_size` differs from their native size. `hints` (never required by the core):
    ``family``, ``modalities`` (token-carrying input -> "vision" | "text"), ``masks`` (mask input ->
    the modality it masks), ``special_tokens`` (modality ->
    token positions never to prune, negative from the end), ``image_size`` / ``text_len`` (what
    the sizes may be), ``image_token_id`` and ``image_tokens`` (placeholders in the text, LLaVA).
    """

    name: str
    model: torch.nn.Module
    task: TaskAdapter
    make_inputs: Callable[..., dict]
    hints: dict = field(default_factory=dict)
    source: str = "registry"

    def example_inputs(self, batch_size: int = 2, **kw: Any) -> dict:
        """make_inputs(batch_size, **kw), moved to the model's device."""
        inputs = self.make_inputs(batch_size, **kw)
        device = _model_device(self.model)
        if device is None or device.type == "cpu":
            return inputs
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def example_batch(self, batch_size: int = 2, *, seed: int = 0, **kw: Any) -> dict:
        """example_inputs plus ``labels`` where the task loss needs them (drop them before the forward)."""
        batch = self.example_inputs(batch_size, seed=seed, **kw)
        labels = self.task.example_labels(batch_size, seed=seed)
        if labels is not None:
            device = _model_device(self.model)
            batch["labels"] = labels if device is None else labels.to(device)
        return batch
