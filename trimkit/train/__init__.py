"""Training trimmed models: one loop (:mod:`.loop`) summing a list of loss terms (:mod:`.losses`),
configured by :class:`TrainConfig` (:mod:`.config`), with checkpoints (:mod:`.checkpoints`) and the
inference-threshold calibration (:mod:`.calibrate`). :func:`train` is SmartTrim training
(:mod:`.trainer`); the bench's fine-tuning and base training run the same loop.

Names are loaded on first use, so that ``from trimkit.train import TrainConfig`` (the command line
builds its options from it) does not import torch and transformers.
"""
from __future__ import annotations

import importlib

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "prepare", "calibrate_threshold", "latest_checkpoint",
           "executed_ratio", "target_at", "tau_at", "cost_loss", "distill_loss", "logit_penalty", "Loop", "run_loop",
           "Batch"]

_HOME = {"TrainConfig": "trimkit.train.config", "TrainResult": "trimkit.train.trainer", "train": "trimkit.train.trainer",
         "prepare": "trimkit.train.trainer", "evaluate": "trimkit.evaluate", "executed_ratio": "trimkit.evaluate",
         "calibrate_threshold": "trimkit.train.calibrate", "latest_checkpoint": "trimkit.train.checkpoints",
         "target_at": "trimkit.train.schedules", "tau_at": "trimkit.train.schedules",
         "cost_loss": "trimkit.train.losses", "distill_loss": "trimkit.train.losses",
         "logit_penalty": "trimkit.train.losses", "Batch": "trimkit.train.losses", "Loop": "trimkit.train.loop",
         "run_loop": "trimkit.train.loop"}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'trimkit.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
