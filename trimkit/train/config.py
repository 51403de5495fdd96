"""The settings of :func:`trimkit.train.train`: one frozen dataclass whose fields also describe the
``trimkit train`` options (help text, lower bound, command-line default) in their metadata."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from trimkit.errors import ConfigError

__all__ = ["TrainConfig", "setting"]


def setting(default: Any, help: str | None = None, *, low: float | None = None, cli: bool = True,
            cli_default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose metadata describes its command-line option.

    help: the option's help text; low: the smallest value the option accepts (a click range);
    cli: False keeps the field off the command line; cli_default: the option's default when it
    differs from the field's.
    """
    meta = {"help": help, "low": low, "cli": cli}
    if cli_default is not dataclasses.MISSING:
        meta["cli_default"] = cli_default
    return dataclasses.field(default=default, metadata=meta)


_COUNTS = {"batch_size": 1, "grad_accum": 1, "checkpoint_every": 0, "keep_checkpoints": 1, "measure_every": 0,
           "seed": 0, "calibrate": 0, "workers": 0, "lora_rank": 1}
_POSITIVE = ("lr_trimmer", "temperature", "tau_start", "tau_end")
_NON_NEGATIVE = ("lr_backbone", "weight_decay", "alpha", "beta", "hidden_weight", "clip_norm", "full_task",
                 "dual_lr", "logit_penalty", "logit_margin")
_OPTIONAL = ("dual_lr", "undershoot")  # left out of to_dict when 0: older checkpoints resume
_PLACEMENT = ("device", "workers", "grad_checkpointing")  # where and how fast, not what is learnt: never saved
_DEFAULTS = {"dtype": "float32", "trainable": "all"}  # left out of to_dict at their default
TRAINABLE = ("all", "trimmers", "trimmers+norms", "lora")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`trimkit.train.train` (every field has a working default for -tiny models).

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
    device / dtype: where the model runs (``cpu``, ``cuda``, ``cuda:N``, ``mps``) and the precision of
      its frozen weights and forward (``bfloat16``, or ``float16`` with loss scaling); trained
      weights and the trimmers stay float32 (:mod:`trimkit.device`).
    trainable: ``all`` (trimmers and backbone, unless freeze_backbone), ``trimmers``,
      ``trimmers+norms`` (and the normalisation layers' weights) or ``lora`` (trimmers and LoRA
      adapters on the located layers' projections, through ``peft``; merged into the weights when saved).
    grad_checkpointing: recompute each located layer's activations in the backward pass.
    workers: data-loading worker processes (0: in the training process).
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

    A new loss term is one class in :mod:`trimkit.train.losses` plus its weight here; a field
    made with :func:`setting` is also a ``trimkit train`` option.
    """

    batch_size: int = setting(16, low=1)
    grad_accum: int = setting(1, low=1)
    lr_trimmer: float = setting(1e-2)
    lr_backbone: float = setting(1e-4)
    freeze_backbone: bool = setting(False, "Train the trimmers only.")
    full_task: float = setting(0.0, "Weight of the task loss of the full-capacity pass (anchors the backbone).",
                               low=0.0)
    alpha: float = setting(1.0, "Weight of the distillation loss.")
    beta: float = setting(10.0, "Weight of the cost loss.")
    dual_lr: float = setting(0.0, "Step of a Lagrange multiplier that holds the FLOPs ratio to the target "
                                  "(0 = off).", low=0.0)
    logit_penalty: float = setting(0.0, "Weight of the squared excess of the trimmers' keep-logits over "
                                        "--logit-margin (0 = off).", low=0.0)
    logit_margin: float = setting(4.0, "Keep-logit magnitude the penalty leaves free.", low=0.0)
    undershoot: float = setting(0.0, "Train to --target-ratio minus this (negative: above it); the inference "
                                     "threshold is still calibrated to the target.")
    cost: Literal["square", "above"] = setting("square", "Cost loss: (r - t)^2, or only a ratio above the target costs.")
    anneal: float = setting(0.3, "Fraction of the steps over which the target anneals from 1.0.")
    schedule: Literal["linear", "cosine"] = setting("linear")
    seed: int = setting(0, low=0)
    checkpoint_every: int = setting(0, "Steps between checkpoints (0: only at the end).", low=0, cli_default=100)
    measure_every: int = setting(25, "Steps between executed-FLOPs measurements (0: never).", low=0)
    weight_decay: float = setting(0.0, cli=False)
    temperature: float = setting(1.0, cli=False)
    hidden_weight: float = setting(0.0, cli=False)
    tau_start: float = setting(1.0, cli=False)
    tau_end: float = setting(0.5, cli=False)
    clip_norm: float = setting(1.0, cli=False)
    keep_checkpoints: int = setting(2, cli=False)
    calibrate: int = setting(256, cli=False)
    device: str = setting("cpu", "Device: cpu, cuda, cuda:N or mps.")
    dtype: Literal["float32", "bfloat16", "float16"] = setting(
        "float32", "Precision of the forward and the frozen weights (float16: with loss scaling); trained weights "
                   "and trimmers stay float32.")
    trainable: Literal["all", "trimmers", "trimmers+norms", "lora"] = setting(
        "all", "What trains: all (trimmers + backbone), trimmers, trimmers+norms, or lora "
               "(adapters through peft).")
    grad_checkpointing: bool = setting(False, "Recompute the backbone layers' activations in the backward pass "
                                              "(less memory, one more forward).")
    workers: int = setting(0, "Data-loading worker processes.", low=0)
    lora_rank: int = setting(8, cli=False)

    def __post_init__(self) -> None:
        for name, low in _COUNTS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"train: {name} must be an integer >= {low}, got {value!r}")
        for name in _POSITIVE:
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"train: {name} must be > 0, got {getattr(self, name)!r}")
        for name in _NON_NEGATIVE:
            value = float(getattr(self, name))
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"train: {name} must be >= 0, got {getattr(self, name)!r}")
        if not -1.0 < float(self.undershoot) < 1.0:  # the training target must stay in (0, 1]
            raise ConfigError(f"train: undershoot must be in (-1, 1), got {self.undershoot!r}")
        if not 0.0 <= self.anneal <= 1.0:
            raise ConfigError(f"train: anneal must be in [0, 1], got {self.anneal}")
        if self.cost not in ("square", "above"):
            raise ConfigError(f"train: cost must be 'square' or 'above', got {self.cost!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"train: dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"train: trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        if self.freeze_backbone and self.trainable not in ("all", "trimmers"):
            raise ConfigError(f"train: freeze_backbone trains the trimmers only; it contradicts trainable "
                              f"{self.trainable!r}")
        if self.schedule not in ("linear", "cosine"):
            raise ConfigError(f"train: schedule must be 'linear' or 'cosine', got {self.schedule!r}")

    def to_dict(self) -> dict:
        """The fields as a dict, without the options that are off and postdate saved checkpoints."""
        data = dataclasses.asdict(self)
        for name in _OPTIONAL:
            if not data[name]:
                del data[name]
        for name in _PLACEMENT:
            del data[name]
        for name, default in _DEFAULTS.items():
            if data[name] == default:
                del data[name]
        if data.get("trainable") != "lora":
            del data["lora_rank"]
        if not data["logit_penalty"]:  # the margin does nothing without the penalty
            del data["logit_penalty"], data["logit_margin"]
        return data
