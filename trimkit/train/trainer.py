"""SmartTrim training: self-distillation of a trimmed model towards a target executed-FLOPs ratio.

The loss of one batch is ``L = L_task + alpha * L_distill + beta * L_cost`` (terms of
:mod:`trimkit.train.losses`, summed by :func:`trimkit.train.loop.run_loop`):

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

Checkpoints: see :mod:`trimkit.train.checkpoints`. Ctrl-C saves a checkpoint before leaving; a
non-finite loss saves the last good state and stops.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from trimkit.runtime import set_tau, state, train_logits, trimming_off
from trimkit.cost import calibrate, cost_model, expected_ratio
from trimkit.data import format_data_spec, load_dataset
from trimkit.errors import ConfigError, TrimkitError
from trimkit.evaluate import backbone_of, executed_ratio
from trimkit.io import prepare_out_dir, staged_out_dir
from trimkit.passes import applied_passes, apply_, trainable_parameters
from trimkit.tasks import adapt, model_batch, refreshed, resolve_data, task_dataset
from trimkit.train.calibrate import calibrate_threshold, calibration_batches, unpadded_rows, with_threshold
from trimkit.train.checkpoints import (CHECKPOINTS, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                                       set_rng_state)
from trimkit.train.config import TrainConfig
from trimkit.train.distributed import Group, barrier, global_mean
from trimkit.train.loop import LoadedBatches, Loop, NonFiniteLoss, SeededBatches, run_loop
from trimkit.train.memory import norm_parameters
from trimkit.train.placement import Placement
from trimkit.train.losses import Batch, smarttrim_terms
from trimkit.train.output import HiddenStates, ProgressBar, survivor_masks, write_folder
from trimkit.train.schedules import target_at, tau_at

__all__ = ["TrainResult", "train", "prepare", "smarttrim_optimizer"]


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
# Model preparation
# ----------------------------------------------------------------------------------------------
def _recipe_target(model: nn.Module) -> float | None:
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
    backbone = backbone_of(model_or_backbone)
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
# One forward of the trimmed model, and what the terms read from it
# ----------------------------------------------------------------------------------------------
class _Outputs:
    """The trimmed forward (``student``, ``ratio``, ``keep_logits``) and, on demand, the full-capacity
    forward with gradient (``full()``), the teacher's logits and the hidden states."""

    def __init__(self, step: "_SmartTrimForward", model: nn.Module, batch: Batch):
        self._step, self._model, self._inputs = step, model, batch.inputs
        self.student = (step.runner or model)(**batch.inputs)
        self.ratio = global_mean(expected_ratio(model), step.group)
        self.keep_logits = train_logits(model) if step.keep_logits else []
        hidden = step.hidden
        self._masks = survivor_masks(model) if hidden is not None else {}
        self._student_hidden = hidden.take() if hidden is not None else {}
        self._full = self._teacher = None
        self._teacher_hidden: dict = {}
        self.logged = {"ratio": self.ratio}

    def full(self):
        """The same model with trimming off, in training mode, with gradient (once per batch)."""
        if self._full is None:
            with trimming_off(self._model):
                self._full = self._model(**self._inputs)
            self._teacher_hidden = self._step.hidden.take() if self._step.hidden is not None else {}
        return self._full

    def teacher_logits(self) -> torch.Tensor:
        if self._teacher is None:
            self._teacher = self._run_teacher()
        return self._teacher

    def _run_teacher(self) -> torch.Tensor:
        step, model = self._step, self._model
        if self._full is not None:  # the full-capacity pass trains too: its logits, detached
            return step.task.logits(self._full).detach()
        with torch.no_grad():
            if step.teacher is not None:
                return step.teacher_task.logits(step.teacher(**self._inputs))
            was = model.training
            model.eval()
            try:
                with trimming_off(model):
                    out = model(**self._inputs)
            finally:
                model.train(was)
            self._teacher_hidden = step.hidden.take() if step.hidden is not None else {}
            return step.task.logits(out)

    def hidden(self) -> tuple[dict, dict, dict]:
        """``(student, teacher, masks)``: final hidden states per stream and the kept-token masks."""
        return self._student_hidden, self._teacher_hidden, self._masks


@dataclass
class _SmartTrimForward:
    task: Any
    teacher: nn.Module | None = None
    teacher_task: Any = None
    hidden: HiddenStates | None = None
    keep_logits: bool = False
    runner: nn.Module | None = None
    group: Group = Group()

    def __call__(self, model: nn.Module, batch: Batch) -> _Outputs:
        return _Outputs(self, model, batch)


def _trained_backbone(model: nn.Module, config: TrainConfig, trimmers: set[int]) -> list[nn.Parameter]:
    """The backbone parameters that train besides the trimmers (see ``TrainConfig.trainable``)."""
    if config.freeze_backbone or config.lr_backbone == 0 or config.trainable == "trimmers":
        return []
    if config.trainable == "trimmers+norms":
        return norm_parameters(model, trimmers)
    if config.trainable == "lora":
        return [p for n, p in model.named_parameters() if "lora_" in n and id(p) not in trimmers]
    return [p for p in model.parameters() if id(p) not in trimmers and p.requires_grad]


def smarttrim_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trimmers (``lr_trimmer``) and, unless frozen, the backbone (``lr_backbone``):
    all of it, its norms or its LoRA adapters (``config.trainable``)."""
    trimmers = trainable_parameters(model)
    ids = {id(p) for p in trimmers}
    for p in trimmers:
        p.requires_grad_(True)
    backbone = _trained_backbone(model, config, ids)
    chosen = {id(p) for p in backbone}
    for p in model.parameters():
        if id(p) not in ids and id(p) not in chosen:
            p.requires_grad_(False)
    for p in backbone:
        p.requires_grad_(True)
    groups = [{"params": trimmers, "lr": config.lr_trimmer, "name": "trimmer"}]
    if backbone:
        groups.append({"params": [p for p in backbone if p.requires_grad], "lr": config.lr_backbone,
                       "name": "backbone"})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------
def _meta(config, target, steps, spec, binding, history, base_ref, cost_scale) -> dict:
    return {"config": config.to_dict(), "target_ratio": target, "steps": steps, "data": format_data_spec(spec),
            "binding": binding.to_dict(), "base_ref": base_ref, "history": history, "cost_scale": cost_scale}


def _check_resume(state: dict, config: TrainConfig, target: float, steps: int, path: Path) -> None:
    want = {"config": config.to_dict(), "target_ratio": target, "steps": steps}
    diff = [k for k, v in want.items() if json.loads(json.dumps(v)) != state.get(k)]
    if diff:
        raise ConfigError(f"checkpoint {str(path)!r} was written with other {', '.join(diff)}; "
                          "resume with the same settings or start a new output folder")


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class _Run:
    """One call of :func:`train` after the model is prepared: its loop, history and checkpoints."""

    def __init__(self, prepared: tuple, config: TrainConfig, target: float, steps: int, *, ref: str,
                 out: Path | None, teacher: tuple, progress: bool, callback, placement: Placement):
        self.backbone, self.binding, self.changes, self.spec = prepared
        self.model, self.config, self.target, self.steps, self.ref, self.out = \
            self.backbone.model, config, target, steps, ref, out
        self.progress, self.callback, self.place = progress, callback, placement
        self.main = placement.group.main  # the process that writes checkpoints and the output folder
        seeded = SeededBatches(task_dataset(self.spec, self.binding), config.batch_size, config.seed,
                               shard=placement.shard)
        self.batches = LoadedBatches(seeded, config.workers, placement.device.type == "cuda") \
            if config.workers else seeded
        self.device = placement.device
        placement.add_adapters(self.model, state.get(self.model, state.MAP), config)
        self.opt = smarttrim_optimizer(self.model, config)
        placement.finish_model(self.model)
        self.history: list[dict] = []
        self.start, self.checkpoint, self.executed = 0, None, None
        self.cost = cost_model(self.model)
        self.teacher, self.teacher_task = teacher
        self.rng_at_step: dict = {}
        self.current = 0
        self._last_inputs: dict = {}
        self.bar: ProgressBar | None = None

    def begin(self, resume) -> float:
        """Resume from a checkpoint (`resume`: True or a path) or start fresh; the multiplier's value."""
        if not resume:
            with self.place.precision():
                calibrate(self.model, model_batch(self.binding, self.batches.whole(0), self.device)[0])
            _seed_everything(self.config.seed)
            return 0.0
        path = Path(resume) if isinstance(resume, (str, os.PathLike)) else latest_checkpoint(self.out)
        if path is None:
            raise ConfigError(f"nothing to resume: no checkpoint under {str(self.out / CHECKPOINTS)!r}")
        state = load_checkpoint(path, self.model, self.opt)
        _check_resume(state, self.config, self.target, self.steps, path)
        self.start, self.history = int(state["step"]), list(state["history"])
        scale = state["cost_scale"]
        self.cost.rest, self.cost.overhead, self.cost.calibrated = scale["rest"], scale["overhead"], True
        set_rng_state(state["rng_state"])
        self.checkpoint = path
        return float(self.history[-1].get("lambda", 0.0)) if self.history else 0.0

    def save(self, at: int, rng: dict) -> Path | None:
        if self.out is None or not self.main:
            return None
        meta = _meta(self.config, self.target, self.steps, self.spec, self.binding, self.history[:at], self.ref,
                     self.cost_scale)
        return save_checkpoint(self.out, at, self.model, self.opt, rng, meta, self.config.keep_checkpoints)

    @property
    def cost_scale(self) -> dict:
        return {"rest": self.cost.rest, "overhead": self.cost.overhead}

    def before_step(self, step: int) -> dict:
        self.rng_at_step, self.current = rng_state(), step
        self.model.train()
        self.place.begin_step()
        config = self.config
        goal = target_at(step, self.steps, self.target - config.undershoot, config.anneal, config.schedule)
        tau = tau_at(step, self.steps, config.tau_start, config.tau_end)
        set_tau(self.model, tau)
        return {"target": goal, "tau": tau}

    def after_step(self, step: int, row: dict) -> None:
        every = self.config.measure_every
        if every and ((step + 1) % every == 0 or step + 1 == self.steps):
            inputs = unpadded_rows(self._last_inputs, self.binding)
            with self.place.precision():
                self.executed = row["executed_ratio"] = executed_ratio(self.model, [inputs])
        row.update(self.place.peak())
        self.history.append(row)
        self.bar.update(row, self.executed)
        if self.callback is not None:
            self.callback(step + 1, row)
        if self.config.checkpoint_every and (step + 1) % self.config.checkpoint_every == 0 and step + 1 < self.steps:
            self.checkpoint = self.save(step + 1, rng_state())
            barrier(self.place.group)

    def batch(self, m: int) -> Batch:
        inputs, labels = model_batch(self.binding, self.place.pad(self.batches(m)), self.device)
        self._last_inputs = inputs
        return Batch(inputs, labels)

    def loop(self, dual: float, hidden: HiddenStates | None) -> Loop:
        config, task = self.config, self.backbone.task
        place = self.place
        forward = _SmartTrimForward(task, self.teacher, self.teacher_task, hidden, keep_logits=bool(config.logit_penalty),
                                    runner=place.runner, group=place.group)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        return Loop(self.model, self.opt, self.batch, forward,
                    smarttrim_terms(config, task, self_teacher=self.teacher is None, dual=dual),
                    grad_accum=config.grad_accum, clip=(params, config.clip_norm), before_step=self.before_step,
                    check_finite=True, columns=("task", "distill", "cost", "ratio"), context=place.context,
                    no_sync=place.no_sync, scaler=place.scaler, reduce=place.reduce)

    def run(self, loop: Loop) -> None:
        """The steps, with Ctrl-C and a non-finite loss saving a checkpoint before leaving."""
        self.rng_at_step, self.current = rng_state(), self.start
        try:
            items = self.config.batch_size * self.config.grad_accum
            with ProgressBar(self.progress and self.main, self.steps, self.start, items) as self.bar:
                run_loop(loop, self.steps, start=self.start, after_step=self.after_step)
        except KeyboardInterrupt:
            done = len(self.history)
            where = self.save(done, self.rng_at_step if done == self.current else rng_state())
            raise KeyboardInterrupt(f"interrupted after step {done}"
                                    + (f"; checkpoint saved to {where}" if where else "")) from None
        except NonFiniteLoss as err:
            where = self.save(err.step, self.rng_at_step)
            saved = f"last good checkpoint: {where}" if where else "no out_dir, nothing saved"
            raise TrimkitError(f"{err}; {saved}") from None
        finally:
            self.model.eval()
            if isinstance(self.batches, LoadedBatches):
                self.batches.close()

    def finish(self) -> TrainResult:
        """Checkpoint the last step, calibrate the inference threshold, write the output folder and
        sum up (the checkpoint comes first, so an interrupted calibration loses no training)."""
        config, threshold, calibrated = self.config, None, None
        if self.out is not None:
            self.checkpoint = self.save(self.steps, rng_state())
        self.place.close()  # LoRA adapters merged into the weights they adapt
        if config.calibrate and self.main:
            calib = calibration_batches(self.batches.dataset, self.binding, config.calibrate, config.batch_size,
                                        self.device)
            with self.place.precision():
                threshold, calibrated = calibrate_threshold(self.model, calib, self.target, progress=self.progress)
        if self.out is not None and self.main:
            extra = {"train": {"binding": self.binding.to_dict(), "adapted": self.changes, **_meta(
                config, self.target, self.steps, self.spec, self.binding, [], self.ref, self.cost_scale),
                "history": self.history[-1:], "threshold": threshold, "calibrated_ratio": calibrated,
                **self.place.describe()}}
            configs = with_threshold([r.config for r in applied_passes(self.model)], threshold)
            write_folder(self.out, self.backbone, self.ref, extra, configs)
        last = self.history[-min(10, len(self.history)):]
        expected = float(np.mean([r["ratio"] for r in last])) if last else float("nan")
        return TrainResult(model=self.model, backbone=self.backbone, binding=self.binding, history=self.history,
                           target_ratio=self.target, expected_ratio=expected, executed_ratio=self.executed,
                           out_dir=self.out, checkpoint=self.checkpoint, threshold=threshold,
                           calibrated_ratio=calibrated)


def _check_call(steps, target_ratio, resume, out_dir) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if target_ratio is not None:
        _check_target(target_ratio)
    if resume and out_dir is None and not isinstance(resume, (str, os.PathLike)):
        raise ConfigError("resume needs out_dir (or a checkpoint path)")


def train(model_or_backbone, data_spec: str, *, target_ratio: float | None = None, steps: int = 300,
          recipe=None, out_dir: str | os.PathLike | None = None, config: TrainConfig = TrainConfig(),
          teacher: nn.Module | None = None, base_ref: str | None = None, resume: bool | str = False,
          overwrite: bool = False, progress: bool = True,
          callback: Callable[[int, dict], None] | None = None) -> TrainResult:
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
    overwrite: replace a trimkit folder at `out_dir`; it is swapped for the new one only once training
      has finished (a failure leaves it as it was). Without it, such a folder is refused up front,
      as is any non-empty folder trimkit did not write.
    callback: called as ``callback(step, row)`` after every step (row = the history entry).

    Under ``torchrun`` (or ``trimkit train --nproc N``) every process runs this call on its shard of
    each batch (:mod:`trimkit.train.distributed`); the first writes the checkpoints and the folder.
    """
    _check_call(steps, target_ratio, resume, out_dir)
    placement = Placement.start(config)
    out = None
    if out_dir is not None and not placement.group.main:  # reads a checkpoint to resume, writes nothing
        out = Path(out_dir) if resume else None
    elif out_dir is not None:
        from_folder = bool(resume) and not isinstance(resume, (str, os.PathLike))
        out = prepare_out_dir(out_dir, overwrite=overwrite, resume=from_folder, label="output folder")
    args = (model_or_backbone, data_spec, target_ratio, steps, recipe, config, teacher, base_ref, progress, callback,
            placement)
    if out is None or resume:
        return _train(*args, out=out, resume=resume)
    with staged_out_dir(out, keep_partial=True) as where:
        result = _train(*args, out=where, resume=False)
    return _relocated(result, where, out)


def _relocated(result: TrainResult, where: Path, out: Path) -> TrainResult:
    """`result` with its paths under `where` (a staging folder since swapped in) moved to `out`."""
    if where == out:
        return result
    checkpoint = None if result.checkpoint is None else out / Path(result.checkpoint).relative_to(where)
    return dataclasses.replace(result, out_dir=out, checkpoint=checkpoint)


def _train(model_or_backbone, data_spec, target_ratio, steps, recipe, config, teacher, base_ref, progress, callback,
           placement, *, out: Path | None, resume) -> TrainResult:
    ref = base_ref or (model_or_backbone if isinstance(model_or_backbone, str) else None)
    torch.manual_seed(config.seed)  # trimmer initialisation inside the passes
    prepared = prepare(model_or_backbone, data_spec, recipe=recipe)
    backbone = prepared[0]
    target = _check_target(target_ratio if target_ratio is not None else _recipe_target(backbone.model))
    if config.undershoot and not 0.0 < target - config.undershoot <= 1.0:
        raise ConfigError(f"train: undershoot {config.undershoot} puts the training target "
                          f"{target - config.undershoot:g} outside (0, 1]")
    teacher_task = None
    if teacher is not None:
        teacher.eval().to(placement.device)
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher_task = backbone_of(teacher).task if hasattr(teacher, "config") else backbone.task
    run = _Run(prepared, config, target, steps, ref=ref or backbone.name, out=out, teacher=(teacher, teacher_task),
               progress=progress, callback=callback, placement=placement)
    dual = run.begin(resume)
    hidden = HiddenStates(run.model) if config.hidden_weight > 0 and teacher is None else None
    try:
        run.run(run.loop(dual, hidden))
    finally:
        if hidden is not None:
            hidden.remove()
    return run.finish()
