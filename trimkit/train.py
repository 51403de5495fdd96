"""Generic self-distillation trainer for trimmed models, and the evaluation behind ``trimkit eval``.

The loss of one batch is ``L = L_task + alpha * L_distill + beta * L_cost``:

* ``L_task``: the backbone's task adapter (``TaskAdapter.loss``) on the trimmed forward;
* ``L_distill``: the same model with every trimmer off (:func:`trimkit.runtime.trimming_off`, no
  copy of the weights, no gradient) is the teacher: ``T^2 * KL(teacher || student)`` on the task
  logits at temperature ``T``, plus ``hidden_weight`` times the mean squared error between the
  final hidden states of each stream, over the tokens the student keeps. A separate ``teacher``
  model (e.g. for a quantised student) can replace the self-teacher;
* ``L_cost``: the passes' differentiable expected-FLOPs ratio ``r`` (:func:`trimkit.cost.expected_ratio`)
  against the current target ``t``: ``(r - t)^2`` (``square``) or ``max(r - t, 0)^2`` (``above``).
  With ``dual_lr > 0`` a Lagrange multiplier ``lambda`` (starting at 0) adds ``lambda * (r - t)``
  and moves by ``dual_lr * (r - t)`` after every step: it grows while the ratio is above the target
  and shrinks, down to negative values, while it is below, so the target is reached even where the
  task loss outweighs the square term.
* With ``logit_penalty > 0`` the loss adds ``logit_penalty * mean(max(|z| - logit_margin, 0)^2)`` over
  every keep-logit ``z`` the trimmers gave in the trimmed forward. Unchecked, trimmers push the
  logits of the tokens they like far past where the sigmoid is flat (measured: 41 % of them above
  log-odds 9 on a BLIP trimmer trained for 3x), and there the cost loss has no gradient left.

The target anneals from 1.0 to the final ratio over the first ``anneal`` fraction of the steps
(linear or cosine); the Gumbel temperature goes from ``tau_start`` to ``tau_end``. Trimmers and
backbone have their own learning rates; the backbone can be frozen.

Checkpoints (``OUT/checkpoints/step-NNNNNN/``) hold the model and optimizer tensors as safetensors
and the step, configuration, history and random states as JSON, no pickles. Resuming from one
continues exactly: the data order is a function of (seed, step) and the random state is restored.
Ctrl-C saves a checkpoint before leaving; a non-finite loss saves the last good state and stops.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from trimkit.errors import ConfigError, DataError, TrimkitError
from trimkit.runtime import runtimes, set_tau, state, train_logits, trimming_off

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "prepare", "calibrate_threshold", "target_at", "tau_at",
           "cost_loss", "distill_loss", "logit_penalty", "latest_checkpoint"]

CHECKPOINTS = "checkpoints"
STATE_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train` (every field has a working default for -tiny models).

    batch_size / grad_accum: rows per micro-batch and micro-batches per optimizer step.
    lr_trimmer / lr_backbone: AdamW learning rates; freeze_backbone trains the trimmers only.
    alpha / beta: weights of the distillation and cost losses.
    temperature: distillation temperature; hidden_weight: weight of the hidden-state MSE.
    cost: ``square`` ((r - t)^2) or ``above`` (only a ratio above the target costs).
    anneal / schedule: fraction of the steps over which the target goes from 1 to its final
      value, and how (``linear`` or ``cosine``).
    tau_start / tau_end: Gumbel temperature at the first and last step (linear).
    clip_norm: gradient norm clipping (0 = off). seed: data order, Gumbel noise, dropout.
    checkpoint_every: steps between checkpoints (0 = only at the end); keep_checkpoints: how many stay.
    measure_every: steps between executed-FLOPs measurements on the last batch (0 = never).
    calibrate: training items used after the last step to pick the inference threshold whose
      executed ratio is closest to the target (0 keeps the recipe's thresholds).
    full_task: weight of the task loss of the full-capacity pass (trimmers off) when the backbone
      trains; that pass then runs with gradient and its detached logits are the distillation
      target, which keeps the shared backbone (the teacher) from drifting (0 = teacher without
      gradient, one extra forward only).
    dual_lr: step size of the Lagrange multiplier on ``r - t`` (0 = off: the square cost alone).
    logit_penalty / logit_margin: weight of the squared excess of the keep-logits' magnitude over
      the margin (0 = off), which keeps the trimmers' sigmoids out of their flat tails.
    undershoot: training aims at ``target - undershoot`` while the inference threshold is still
      calibrated to ``target``, so calibration only ever keeps *more* tokens than training did
      (removing tokens the trained model relied on costs far more than keeping a few extra).
      Negative: training stops above the target and calibration removes the rest (e.g. train at
      0.5, read at 0.33).
    """

    batch_size: int = 16
    grad_accum: int = 1
    lr_trimmer: float = 1e-2
    lr_backbone: float = 1e-4
    weight_decay: float = 0.0
    freeze_backbone: bool = False
    alpha: float = 1.0
    beta: float = 10.0
    temperature: float = 1.0
    hidden_weight: float = 0.0
    cost: Literal["square", "above"] = "square"
    anneal: float = 0.3
    schedule: Literal["linear", "cosine"] = "linear"
    tau_start: float = 1.0
    tau_end: float = 0.5
    clip_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    measure_every: int = 25
    calibrate: int = 256
    full_task: float = 0.0
    dual_lr: float = 0.0
    logit_penalty: float = 0.0
    logit_margin: float = 4.0
    undershoot: float = 0.0

    def __post_init__(self) -> None:
        ints = {"batch_size": 1, "grad_accum": 1, "checkpoint_every": 0, "keep_checkpoints": 1,
                "measure_every": 0, "seed": 0, "calibrate": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"train: {name} must be an integer >= {low}, got {value!r}")
        positive = ("lr_trimmer", "temperature", "tau_start", "tau_end")
        for name in positive:
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"train: {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("lr_backbone", "weight_decay", "alpha", "beta", "hidden_weight", "clip_norm", "full_task",
                     "dual_lr", "logit_penalty", "logit_margin"):
            value = float(getattr(self, name))
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"train: {name} must be >= 0, got {getattr(self, name)!r}")
        if not -1.0 < float(self.undershoot) < 1.0:  # the training target must stay in (0, 1]
            raise ConfigError(f"train: undershoot must be in (-1, 1), got {self.undershoot!r}")
        if not 0.0 <= self.anneal <= 1.0:
            raise ConfigError(f"train: anneal must be in [0, 1], got {self.anneal}")
        if self.cost not in ("square", "above"):
            raise ConfigError(f"train: cost must be 'square' or 'above', got {self.cost!r}")
        if self.schedule not in ("linear", "cosine"):
            raise ConfigError(f"train: schedule must be 'linear' or 'cosine', got {self.schedule!r}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if not data["dual_lr"]:  # checkpoints written before the field still resume
            del data["dual_lr"]
        if not data["logit_penalty"]:  # the same for the logit penalty, whose margin then does nothing
            del data["logit_penalty"], data["logit_margin"]
        if not data["undershoot"]:
            del data["undershoot"]
        return data


@dataclass
class TrainResult:
    """What :func:`train` produced: the trained model (in eval mode), its backbone record and binding,
    one history row per step, the output folder and last checkpoint (None without ``out_dir``),
    the final expected ratio (mean of the last steps), the executed ratio measured at the last step,
    and the calibrated inference threshold with its executed ratio on training items."""

    model: nn.Module
    backbone: Any
    binding: Any
    history: list[dict]
    target_ratio: float
    expected_ratio: float
    executed_ratio: float | None
    out_dir: Path | None = None
    checkpoint: Path | None = None
    threshold: float | None = None
    calibrated_ratio: float | None = None

    def to_dict(self) -> dict:
        return {"target_ratio": self.target_ratio, "expected_ratio": self.expected_ratio,
                "executed_ratio": self.executed_ratio, "steps": len(self.history),
                "out_dir": None if self.out_dir is None else str(self.out_dir),
                "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
                "threshold": self.threshold, "calibrated_ratio": self.calibrated_ratio,
                "last": self.history[-1] if self.history else None}


# ----------------------------------------------------------------------------------------------
# Schedules and losses (pure)
# ----------------------------------------------------------------------------------------------
def target_at(step: int, steps: int, final: float, anneal: float, schedule: str = "linear") -> float:
    """The target ratio at `step` (0-based) of `steps`: 1.0 annealed to `final` over `anneal` of them."""
    span = anneal * steps
    progress = 1.0 if span <= 0 else min(1.0, (step + 1) / span)
    if schedule == "cosine":
        progress = (1.0 - math.cos(math.pi * progress)) / 2.0
    return 1.0 - (1.0 - final) * progress


def tau_at(step: int, steps: int, start: float, end: float) -> float:
    """Gumbel temperature at `step`: linear from `start` (first step) to `end` (last step)."""
    progress = step / max(1, steps - 1)
    return start + (end - start) * progress


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


def _hidden_mse(student: dict, teacher: dict, masks: dict) -> torch.Tensor | None:
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
# Data order: a function of (seed, micro-batch index)
# ----------------------------------------------------------------------------------------------
class _Batches:
    """Micro-batch ``m`` of a dataset, drawn from a per-epoch permutation seeded by (seed, epoch)."""

    def __init__(self, dataset, batch_size: int, seed: int):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
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

    def __call__(self, m: int) -> dict:
        from trimkit.data import collate

        epoch, j = divmod(m, self.per_epoch)
        perm = self._permutation(epoch)
        rows = perm[j * self.batch_size:(j + 1) * self.batch_size]
        if len(rows) < self.batch_size:  # a data set smaller than one batch: wrap around
            rows = torch.arange(j * self.batch_size, (j + 1) * self.batch_size) % len(self.dataset)
        return collate([self._item(int(i)) for i in rows])


# ----------------------------------------------------------------------------------------------
# Checkpoints: safetensors + JSON
# ----------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state().clone(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("python") is not None:
        random.setstate(state["python"])
    if state.get("numpy") is not None:
        np.random.set_state(state["numpy"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _json_rng(state: dict) -> dict:
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _rng_from_json(data: dict, tensors: dict) -> dict:
    version, internal, gauss = data["python"]
    name, keys, pos, has_gauss, cached = data["numpy"]
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    return {"torch": tensors["torch"], "python": (version, tuple(internal), gauss),
            "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached), "cuda": cuda}


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().clone().contiguous()
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entry in meta.get("plain", {}).items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def _step_dir(root: Path, step: int) -> Path:
    return root / CHECKPOINTS / f"step-{step:06d}"


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under ``OUT/checkpoints`` (None when there is none)."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    found = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def _save_checkpoint(out_dir: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, rng: dict,
                     meta: dict, keep: int) -> Path:
    final = _step_dir(out_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _optimizer_split(opt)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors = {"torch": rng["torch"]}
        rng_tensors.update({f"cuda.{i}": t for i, t in enumerate(rng.get("cuda", []))})
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = {"format": STATE_FORMAT, "step": step, "optimizer": opt_meta, "rng": _json_rng(rng), **meta}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, allow_nan=True) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    older = sorted(p for p in final.parent.glob("step-*") if p != final and p.name < final.name)
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read checkpoint {str(path)!r}: {err}") from None
    if state.get("format") != STATE_FORMAT:
        raise ConfigError(f"checkpoint {str(path)!r} has format {state.get('format')!r}; expected {STATE_FORMAT}")
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except RuntimeError as err:
        raise ConfigError(f"checkpoint {str(path)!r} does not fit the model: {' '.join(str(err).split())[:200]}") from None
    if missing or unexpected:
        raise ConfigError(f"checkpoint {str(path)!r} does not fit the model: {len(missing)} missing and "
                          f"{len(unexpected)} unexpected tensors (e.g. {sorted(missing or unexpected)[0]})")
    opt.load_state_dict(_optimizer_join(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
    state["rng_state"] = _rng_from_json(state["rng"], load_file(str(path / "rng.safetensors")))
    return state


# ----------------------------------------------------------------------------------------------
# Model preparation
# ----------------------------------------------------------------------------------------------
def _backbone_of(model_or_backbone):
    from trimkit.backbones import Backbone, backbone_for_model, load_backbone

    if isinstance(model_or_backbone, Backbone):
        return model_or_backbone
    if isinstance(model_or_backbone, (str, os.PathLike)):
        return load_backbone(str(model_or_backbone))
    if isinstance(model_or_backbone, nn.Module) and hasattr(model_or_backbone, "config"):
        return backbone_for_model(model_or_backbone)
    raise ConfigError(f"train needs a model reference, a Backbone or a Hugging Face model, "
                      f"got {type(model_or_backbone).__name__}")


def _recipe_target(model: nn.Module) -> float | None:
    from trimkit.passes import applied_passes

    values = [getattr(r.config, "target_ratio") for r in applied_passes(model)
              if isinstance(getattr(r.config, "target_ratio", None), float)]
    return min(values) if values else None


def _check_target(target: float | None) -> float:
    if target is None:
        raise ConfigError("no target ratio: give target_ratio (--target-ratio) or a pass with a target_ratio field")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0:
        raise ConfigError(f"target ratio must be in (0, 1], got {target!r}")
    return float(target)


def prepare(model_or_backbone, data_spec: str, *, recipe=None, split: str | None = None):
    """Load, fit to the data and apply `recipe`: ``(backbone, binding, changes, spec)``."""
    from trimkit.data import load_dataset
    from trimkit.passes import applied_passes, apply_, trainable_parameters
    from trimkit.tasks import adapt, refreshed, resolve_data

    backbone = _backbone_of(model_or_backbone)
    spec = resolve_data(data_spec, backbone, split=split)
    data = load_dataset(spec)
    binding, changes = adapt(backbone, data)
    backbone = refreshed(backbone)
    if recipe is not None:
        report = apply_(backbone.model, recipe, inputs=backbone.example_inputs(2), hints=backbone.hints)
        if report.model is not backbone.model:
            backbone = dataclasses.replace(backbone, model=report.model)
    if not applied_passes(backbone.model) or not trainable_parameters(backbone.model):
        names = ", ".join(type(r.config).name for r in applied_passes(backbone.model)) or "none"
        raise ConfigError(f"nothing to train: no applied pass has trainable trimmers (passes: {names}); "
                          "use a recipe with smarttrim.tokens or smarttrim.heads")
    return backbone, binding, changes, spec


# ----------------------------------------------------------------------------------------------
# The training step
# ----------------------------------------------------------------------------------------------
class _Hidden:
    """Records the first tensor output of each stream's last layer (for the hidden-state MSE)."""

    def __init__(self, model: nn.Module):
        model_map = state.get(model, state.MAP)
        self.paths = [s.layers[-1].path for s in getattr(model_map, "streams", []) if s.layers]
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(p).register_forward_hook(self._make(p)) for p in self.paths]

    def _make(self, path: str):
        def hook(module, args, output):
            from torch.utils._pytree import tree_flatten

            flat = [v for v in tree_flatten(output)[0] if isinstance(v, torch.Tensor)]
            if flat:
                self.outputs[path] = flat[0]
        return hook

    def take(self) -> dict:
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _survivor_masks(model: nn.Module) -> dict:
    masks = {}
    for rt in runtimes(model):
        if hasattr(rt, "cost_inputs"):
            for path, value in rt.cost_inputs().get("tokens", {}).items():
                if isinstance(value, torch.Tensor) and value.dim() == 2:
                    masks[path] = value.detach()
    return masks


def _teacher_logits(model, teacher, task, teacher_task, inputs, hidden):
    was = model.training
    with torch.no_grad():
        if teacher is None:
            model.eval()
            try:
                with trimming_off(model):
                    out = model(**inputs)
            finally:
                model.train(was)
            return task.logits(out), hidden.take() if hidden is not None else {}
        out = teacher(**inputs)
        return teacher_task.logits(out), {}


def _unpadded_rows(inputs: dict, binding) -> dict:
    """The rows of a batch whose text is not padded (the longest ones): a batch without padding."""
    text = dict(binding.keys).get("attention_mask")
    mask = inputs.get(text) if text else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return inputs
    full = (mask != 0).all(1)
    if bool(full.all()) or not bool(full.any()):
        return inputs
    rows = full.nonzero().flatten()
    n = mask.shape[0]
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
            for k, v in inputs.items()}


def _executed_ratio(model: nn.Module, inputs: dict) -> float:
    from trimkit.profile import count_flops

    with torch.no_grad():
        trimmed = count_flops(model, inputs).flops
        with trimming_off(model):
            full = count_flops(model, inputs).flops
    return float(trimmed / full) if full else float("nan")


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------
class _Bar:
    def __init__(self, enabled: bool, steps: int, start: int):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), console=Console(stderr=True))
            self.task = self.bar.add_task("train", total=steps, completed=start, info="")

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, row: dict, executed: float | None) -> None:
        if self.bar is None:
            return
        info = (f"loss {row['loss']:.3f} (task {row['task']:.3f} distill {row['distill']:.3f} "
                f"cost {row['cost']:.4f})  r {row['ratio']:.3f} -> {row['target']:.3f}  "
                f"executed {'-' if executed is None else f'{executed:.3f}'}")
        self.bar.update(self.task, advance=1, info=info)


# ----------------------------------------------------------------------------------------------
# Saving the trained folder
# ----------------------------------------------------------------------------------------------
def _base_writer(model: nn.Module):
    """A writer of the backbone without its passes: a fresh instance of the (adapted) Hugging Face
    class with the trained weights copied where names and shapes agree; None for other models
    (``save_folder`` then re-loads the reference)."""
    from trimkit.io import hf_base_writer
    from trimkit.tasks import _is_hf

    if not _is_hf(model):
        return None

    def write(where: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            fresh = type(model)(model.config)
        own = model.state_dict()
        fitting = {k: v for k, v in fresh.state_dict().items() if k in own and own[k].shape == v.shape}
        fresh.load_state_dict({k: own[k] for k in fitting}, strict=False)
        hf_base_writer(fresh)(where)

    return write


def _write_folder(out_dir: Path, backbone, base_ref: str, extra: dict, configs: list | None = None) -> None:
    """Write the trimkit folder into `out_dir`, next to its ``checkpoints`` folder."""
    from trimkit.io import save_folder

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.save-", dir=out_dir.parent))
    try:
        target = staging / "folder"
        save_folder(target, base_ref=base_ref, model=backbone.model, base_model_dir_writer=_base_writer(backbone.model),
                    recipe_configs=configs, extra=extra)
        for entry in sorted(target.iterdir(), key=lambda p: p.name == "trimkit.json"):
            dest = out_dir / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(entry, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Inference threshold
# ----------------------------------------------------------------------------------------------
def _eval_ratio(model: nn.Module, batches: list[dict]) -> float:
    """Row-weighted executed-FLOPs ratio (hard counts of the cost model) of eval forwards."""
    from trimkit.cost import expected_ratio

    total, rows = 0.0, 0
    with torch.no_grad():
        for inputs in batches:
            model(**inputs)
            n = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim())
            total += float(expected_ratio(model)) * n
            rows += n
    return total / rows


_LOGIT_SPAN = 24.0  # calibration searches keep-logit thresholds in [-span, span]


def calibrate_threshold(model: nn.Module, batches: list[dict], target: float, *, iterations: int = 16) -> tuple[float, float]:
    """The shared inference threshold whose executed ratio on `batches` (unpadded model inputs) is
    closest to `target`, set on every runtime; ``(threshold, ratio)``. Ratios fall as it rises.

    The search bisects the threshold's log-odds in ``[-24, 24]``, starting at 0.5: trained
    trimmers often give the tokens they like keep-logits far above 9 (probabilities that a search in
    probability space, halving ``[0, 1]``, never gets past), and those would stay kept at any
    threshold it can reach."""
    from trimkit.runtime import set_threshold

    was = model.training
    model.eval()
    tried: list[tuple[float, float]] = []
    try:
        lo, hi = -_LOGIT_SPAN, _LOGIT_SPAN
        for z in (0.0, *([None] * iterations)):
            z = (lo + hi) / 2 if z is None else z
            th = 1.0 / (1.0 + math.exp(-z))
            set_threshold(model, th)
            ratio = _eval_ratio(model, batches)
            tried.append((th, ratio))
            if ratio > target:
                lo = z
            else:
                hi = z
        best = min(tried, key=lambda t: (abs(t[1] - target), abs(t[0] - 0.5)))
        set_threshold(model, best[0])
    finally:
        model.train(was)
    return best


def _calibration_batches(dataset, binding, count: int, batch_size: int, device) -> list[dict]:
    from trimkit.data import collate
    from trimkit.tasks import model_batch

    items = [dataset[i] for i in range(min(count, len(dataset)))]
    return [model_batch(binding, collate([items[i] for i in group]), device)[0]
            for group in _buckets(items, batch_size)]


def _with_threshold(configs: list, threshold: float | None) -> list:
    if threshold is None:
        return configs
    return [dataclasses.replace(c, threshold=threshold) if "threshold" in {f.name for f in dataclasses.fields(c)}
            else c for c in configs]


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------
def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    from trimkit.passes import trainable_parameters

    trimmers = trainable_parameters(model)
    ids = {id(p) for p in trimmers}
    backbone = [p for p in model.parameters() if id(p) not in ids]
    for p in trimmers:
        p.requires_grad_(True)
    if config.freeze_backbone or config.lr_backbone == 0:
        for p in backbone:
            p.requires_grad_(False)
        backbone = []
    groups = [{"params": trimmers, "lr": config.lr_trimmer, "name": "trimmer"}]
    if backbone:
        groups.append({"params": [p for p in backbone if p.requires_grad], "lr": config.lr_backbone,
                       "name": "backbone"})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def _finite(values: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in values.values())


def _describe(values: Mapping[str, torch.Tensor]) -> str:
    return ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in values.items())


def _meta(config, target, steps, spec, binding, history, base_ref, cost_scale) -> dict:
    from trimkit.data import format_data_spec

    return {"config": config.to_dict(), "target_ratio": target, "steps": steps, "data": format_data_spec(spec),
            "binding": binding.to_dict(), "base_ref": base_ref, "history": history, "cost_scale": cost_scale}


def _check_resume(state: dict, config: TrainConfig, target: float, steps: int, path: Path) -> None:
    want = {"config": config.to_dict(), "target_ratio": target, "steps": steps}
    diff = [k for k, v in want.items() if json.loads(json.dumps(v)) != state.get(k)]
    if diff:
        raise ConfigError(f"checkpoint {str(path)!r} was written with other {', '.join(diff)}; "
                          "resume with the same settings or start a new output folder")


def train(model_or_backbone, data_spec: str, *, target_ratio: float | None = None, steps: int = 300,
          recipe=None, out_dir: str | os.PathLike | None = None, config: TrainConfig = TrainConfig(),
          teacher: nn.Module | None = None, base_ref: str | None = None, resume: bool | str = False,
          progress: bool = True, callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train the trimmers (and, unless frozen, the backbone) of a model towards `target_ratio`.

    model_or_backbone: a model reference (``"vilt-vqa-tiny"``, a folder, ``file.py:factory``), a
      `Backbone`, or a Hugging Face model; it is fitted to the data (:mod:`trimkit.tasks`), then
      `recipe` (a recipe path or text, configs, or None when passes are already applied) is applied.
    data_spec: a ``--data`` spec; its ``train`` split is used unless it names one.
    target_ratio: final executed-FLOPs ratio in (0, 1]; None takes the passes' ``target_ratio``.
    out_dir: checkpoints go to ``OUT/checkpoints``, the trained model to ``OUT`` (a folder that
      ``trimkit eval --model OUT`` and `trimkit.io.load_folder` read). None keeps it in memory.
    teacher: a separate teacher model taking the same inputs (default: the model, trimmers off).
    resume: True continues from the newest checkpoint in `out_dir`, a path from that checkpoint.
    callback: called as ``callback(step, row)`` after every step (row = the history entry).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if target_ratio is not None:
        _check_target(target_ratio)
    if resume and out_dir is None and not isinstance(resume, (str, os.PathLike)):
        raise ConfigError("resume needs out_dir (or a checkpoint path)")
    from trimkit.cost import calibrate, cost_model, expected_ratio
    from trimkit.tasks import model_batch, task_dataset

    ref = base_ref or (model_or_backbone if isinstance(model_or_backbone, str) else None)
    torch.manual_seed(config.seed)  # trimmer initialisation inside the passes
    backbone, binding, changes, spec = prepare(model_or_backbone, data_spec, recipe=recipe)
    ref = ref or backbone.name
    target = _check_target(target_ratio if target_ratio is not None else _recipe_target(backbone.model))
    if config.undershoot and not 0.0 < target - config.undershoot <= 1.0:
        raise ConfigError(f"train: undershoot {config.undershoot} puts the training target "
                          f"{target - config.undershoot:g} outside (0, 1]")
    model, task = backbone.model, backbone.task
    teacher_task = None
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher_task = _backbone_of(teacher).task if hasattr(teacher, "config") else task
    out = None if out_dir is None else Path(out_dir).expanduser()
    batches = _Batches(task_dataset(spec, binding), config.batch_size, config.seed)
    device = next(model.parameters()).device
    opt = _optimizer(model, config)
    history: list[dict] = []
    start = 0
    checkpoint = None
    cm = cost_model(model)
    dual = 0.0  # the Lagrange multiplier (dual_lr > 0); a resumed run reads it from the history
    if resume:
        path = Path(resume) if isinstance(resume, (str, os.PathLike)) else latest_checkpoint(out)
        if path is None:
            raise ConfigError(f"nothing to resume: no checkpoint under {str(out / CHECKPOINTS)!r}")
        state = _load_checkpoint(path, model, opt)
        _check_resume(state, config, target, steps, path)
        start, history = int(state["step"]), list(state["history"])
        dual = float(history[-1].get("lambda", 0.0)) if history else 0.0
        cm.rest, cm.overhead, cm.calibrated = state["cost_scale"]["rest"], state["cost_scale"]["overhead"], True
        _set_rng_state(state["rng_state"])
        checkpoint = path
    else:
        calibrate(model, model_batch(binding, batches(0), device)[0])
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)
    cost_scale = {"rest": cm.rest, "overhead": cm.overhead}
    hidden = _Hidden(model) if config.hidden_weight > 0 and teacher is None else None
    params = [p for g in opt.param_groups for p in g["params"]]
    rng_at_step = _rng_state()
    executed = None
    step = start

    def save(at: int, rng: dict) -> Path | None:
        if out is None:
            return None
        meta = _meta(config, target, steps, spec, binding, history[:at], ref, cost_scale)
        return _save_checkpoint(out, at, model, opt, rng, meta, config.keep_checkpoints)

    try:
        with _Bar(progress, steps, start) as bar:
            for step in range(start, steps):
                rng_at_step = _rng_state()
                model.train()
                goal = target_at(step, steps, target - config.undershoot, config.anneal, config.schedule)
                tau = tau_at(step, steps, config.tau_start, config.tau_end)
                set_tau(model, tau)
                sums = {"loss": 0.0, "task": 0.0, "distill": 0.0, "cost": 0.0, "ratio": 0.0}
                for micro in range(config.grad_accum):
                    inputs, labels = model_batch(binding, batches(step * config.grad_accum + micro), device)
                    outputs = model(**inputs)
                    ratio = expected_ratio(model)
                    bound = logit_penalty(train_logits(model), config.logit_margin) if config.logit_penalty else None
                    masks = _survivor_masks(model) if hidden is not None else {}
                    student_hidden = hidden.take() if hidden is not None else {}
                    labelled = {**inputs, "labels": labels} if labels is not None else inputs
                    task_loss = task.loss(outputs, labelled)
                    if config.full_task > 0 and teacher is None and not config.freeze_backbone:
                        # the full-capacity pass learns the task too, so the shared backbone (the
                        # teacher) is anchored; its logits are the distillation target, detached
                        with trimming_off(model):
                            full_out = model(**inputs)
                        full_task = task.loss(full_out, labelled)
                        task_loss = task_loss + config.full_task * full_task
                        t_logits, t_hidden = task.logits(full_out).detach(), (hidden.take() if hidden is not None else {})
                    else:
                        t_logits, t_hidden = _teacher_logits(model, teacher, task, teacher_task, inputs, hidden)
                    parts = {"task": task_loss, "distill": distill_loss(task.logits(outputs), t_logits,
                                                                        config.temperature),
                             "cost": cost_loss(ratio, goal, config.cost)}
                    if hidden is not None:
                        mse = _hidden_mse(student_hidden, t_hidden, masks)
                        if mse is not None:
                            parts["distill"] = parts["distill"] + config.hidden_weight * mse
                    loss = parts["task"] + config.alpha * parts["distill"] + config.beta * parts["cost"]
                    if bound is not None:
                        parts["logit"] = bound
                        loss = loss + config.logit_penalty * bound
                    if dual:  # the Lagrange term on the ratio gap (dual_lr > 0)
                        loss = loss + dual * (ratio - goal)
                    if not _finite({"loss": loss, **parts}):
                        where = save(step, rng_at_step)
                        saved = f"last good checkpoint: {where}" if where else "no out_dir, nothing saved"
                        raise TrimkitError(f"loss is not finite at step {step + 1} ({_describe({'loss': loss, **parts})}); "
                                           f"{saved}")
                    (loss / config.grad_accum).backward()
                    for key, value in (("loss", loss), *parts.items(), ("ratio", ratio)):
                        sums[key] = sums.get(key, 0.0) + float(value.detach()) / config.grad_accum
                if config.clip_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                row = {"step": step + 1, **sums, "target": goal, "tau": tau}
                if config.dual_lr > 0:
                    dual = dual + config.dual_lr * (sums["ratio"] - goal)
                    row["lambda"] = dual
                if config.measure_every and ((step + 1) % config.measure_every == 0 or step + 1 == steps):
                    executed = row["executed_ratio"] = _executed_ratio(model, _unpadded_rows(inputs, binding))
                history.append(row)
                bar.update(row, executed)
                if callback is not None:
                    callback(step + 1, row)
                if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < steps:
                    checkpoint = save(step + 1, _rng_state())
    except KeyboardInterrupt:
        where = save(len(history), rng_at_step if len(history) == step else _rng_state())
        if hidden is not None:
            hidden.remove()
        raise KeyboardInterrupt(f"interrupted after step {len(history)}"
                                + (f"; checkpoint saved to {where}" if where else "")) from None
    finally:
        model.eval()
    if hidden is not None:
        hidden.remove()
    threshold = calibrated = None
    if config.calibrate:
        calib = _calibration_batches(batches.dataset, binding, config.calibrate, config.batch_size, device)
        threshold, calibrated = calibrate_threshold(model, calib, target)
    if out is not None:
        from trimkit.passes import applied_passes

        checkpoint = save(steps, _rng_state())
        extra = {"train": {"binding": binding.to_dict(), "adapted": changes, **_meta(
            config, target, steps, spec, binding, [], ref, cost_scale), "history": history[-1:],
            "threshold": threshold, "calibrated_ratio": calibrated}}
        configs = _with_threshold([r.config for r in applied_passes(model)], threshold)
        _write_folder(out, backbone, ref, extra, configs)
    last = history[-min(10, len(history)):]
    expected = float(np.mean([r["ratio"] for r in last])) if last else float("nan")
    return TrainResult(model=model, backbone=backbone, binding=binding, history=history, target_ratio=target,
                       expected_ratio=expected, executed_ratio=executed, out_dir=out, checkpoint=checkpoint,
                       threshold=threshold, calibrated_ratio=calibrated)


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------
class _Untrimmed(nn.Module):
    """The same model with every trimmer off (for interleaved latency against the trimmed one)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, **inputs):
        with trimming_off(self.inner):
            return self.inner(**inputs)


class _Synced(nn.Module):
    """Waits for the device after each forward, so wall-clock timings of CUDA models are complete."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, **inputs):
        out = self.inner(**inputs)
        torch.cuda.synchronize()
        return out


def _saved_binding(backbone):
    if getattr(backbone, "source", "") != "trimkit":
        return None
    from trimkit.io import read_manifest
    from trimkit.tasks import Binding

    saved = read_manifest(backbone.name).get("extra", {}).get("train", {}).get("binding")
    return Binding.from_dict(saved) if saved else None


def _distribution(values) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95))}


def _buckets(items: list[dict], batch_size: int) -> list[list[int]]:
    """Item indices grouped by text length, in chunks of at most `batch_size`: batches without padding
    (a removed token then never meets a padded one)."""
    by_len: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        by_len.setdefault(int(item["input_ids"].shape[-1]), []).append(i)
    return [group[lo:lo + batch_size] for _, group in sorted(by_len.items())
            for lo in range(0, len(group), batch_size)]


def _same_length_rows(items: list[dict], rows: int) -> list[dict]:
    """`rows` items of one text length (the commonest), repeated when there are fewer."""
    group = max(_buckets(items, len(items)), key=len)
    return [items[group[i % len(group)]] for i in range(rows)]


def evaluate(model_or_backbone, data_spec: str, *, batch_size: int = 16, samples: int = 32, latency: bool = True,
             latency_batch: int = 8, threads: int = 1, warmup: int = 3, repeats: int = 10,
             split: str = "val") -> dict:
    """The ``trimkit eval --json`` report of a model on a data set.

    The metric runs over the whole data set (the spec's split, `split` when it names none) in
    batches of `batch_size`; executed FLOPs are counted one sample at a time over the first
    `samples` items, trimmed and untrimmed; latency is interleaved against the same model with
    every trimmer off at batch 1 and `latency_batch`. Ratios are trimmed / untrimmed.
    """
    from trimkit.data import collate, format_data_spec, load_dataset
    from trimkit.profile import compare_latency, count_flops
    from trimkit.tasks import adapt, binding_for, metric_of, model_batch, refreshed, resolve_data, task_dataset

    for label, value in (("batch_size", batch_size), ("samples", samples), ("latency_batch", latency_batch),
                         ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{label} must be a positive integer, got {value!r}")
    backbone = _backbone_of(model_or_backbone)
    spec = resolve_data(data_spec, backbone, split=split)
    data = load_dataset(spec)
    binding = _saved_binding(backbone)
    if binding is None:
        from trimkit.passes import applied_passes

        if applied_passes(backbone.model):
            binding = binding_for(backbone, data)
        else:
            binding, _ = adapt(backbone, data)
            backbone = refreshed(backbone)
    model, task = backbone.model.eval(), backbone.task
    dataset = task_dataset(spec, binding)
    items = [dataset[i] for i in range(len(dataset))]
    device = next(model.parameters()).device
    logits, labels = {"trimmed": [], "untrimmed": []}, []
    values: dict[str, list] = {"trimmed": [], "untrimmed": []}
    with torch.no_grad():
        for group in _buckets(items, batch_size):
            inputs, y = model_batch(binding, collate([items[i] for i in group]), device)
            for side in ("trimmed", "untrimmed"):
                if side == "untrimmed":
                    with trimming_off(model):
                        out = model(**inputs)
                else:
                    out = model(**inputs)
                if binding.metric_task == "retrieval":
                    values[side].append(metric_of(binding, task.logits(out).cpu(), None)[1])
                else:
                    logits[side].append(task.logits(out).float().cpu())
            if y is not None:
                labels.append(y.cpu())
    if binding.metric_task == "retrieval":
        name = "recall@1"
        metric = {side: float(np.mean(v)) for side, v in values.items()}
    else:
        y = torch.cat(labels)
        scored = {side: metric_of(binding, torch.cat(v), y) for side, v in logits.items()}
        name = scored["trimmed"][0]
        metric = {side: s[1] for side, s in scored.items()}
    count = min(samples, len(items))
    flops = {"trimmed": [], "untrimmed": []}
    for i in range(count):
        inputs, _ = model_batch(binding, collate([items[i]]), device)
        flops["trimmed"].append(count_flops(model, inputs).flops)
        with trimming_off(model):
            flops["untrimmed"].append(count_flops(model, inputs).flops)
    report = {"model": backbone.name, "data": format_data_spec(spec), "items": len(items),
              "metric": {"name": name, "value": metric["trimmed"]},
              "metric_untrimmed": {"name": name, "value": metric["untrimmed"]},
              "flops": _distribution(flops["trimmed"]), "flops_untrimmed": _distribution(flops["untrimmed"]),
              "flops_samples": count}
    report["flops_ratio"] = report["flops"]["mean"] / report["flops_untrimmed"]["mean"]
    report["latency_ratio"] = {"batch_1": None, f"batch_{latency_batch}": None}
    report["latency_ms"] = {}
    if latency:
        full, trimmed = _Untrimmed(model), model
        if device.type == "cuda":
            full, trimmed = _Synced(full), _Synced(model)
        for size in (1, latency_batch):
            inputs, _ = model_batch(binding, collate(_same_length_rows(items, size)), device)
            timing = compare_latency(full, trimmed, inputs, threads=threads, warmup=warmup, repeats=repeats)
            report["latency_ratio"][f"batch_{size}"] = timing["b_ms"] / timing["a_ms"] if timing["a_ms"] else None
            report["latency_ms"][f"batch_{size}"] = {"trimmed": timing["b_ms"], "untrimmed": timing["a_ms"]}
    report["threads"] = threads
    return report
