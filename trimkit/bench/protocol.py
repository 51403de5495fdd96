"""A frozen evaluation protocol: one file that fixes every setting of an accuracy comparison before
its test split is read.

A protocol (TOML, e.g. ``benchmarks/protocols/where-v1.toml``) names the shipped models, the data
and its three splits (size and seed each; the test seed is fresh), SmartTrim's targets, seeds and
training settings (one recipe for every point, only the target ratio changes), the baselines with
the targets they are fine-tuned at, the controls and the non-inferiority margins. Every run records
the file's SHA-256 (`Protocol.digest`); a run made under another version of the file is not reused.

Runs per model (:func:`plan`):

* ``prior``: the text-only prior (each question text's majority answer on the training split).
* ``full``: the shipped model as it is.
* ``full+ft``: the shipped model fine-tuned with SmartTrim's budget (steps, batch, backbone
  learning rate), task loss only and no trimming: the control for SmartTrim's extra training
  (none when SmartTrim freezes the backbone: the full model is then its own control).
* ``smarttrim``: tokens + heads trained to each target ratio, ``seeds`` seeds.
* ``<baseline>``: training-free, calibrated to the executed-FLOPs ratio SmartTrim's seed 0 reached
  on the validation split at the same target; ``<baseline>+ft`` also fine-tuned with SmartTrim's
  budget (steps, batch; backbone learning rate ``finetune_lr``, task loss + distillation from the
  untrimmed model) at ``finetune_ratios``.
"""
from __future__ import annotations

import hashlib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trimkit.bench.run import point_name
from trimkit.errors import ConfigError

__all__ = ["Protocol", "ProtocolRun", "load_protocol", "plan", "BASELINE_NAMES", "CONTROL", "PRIOR"]

BASELINE_NAMES: tuple[str, ...] = ("random.tokens", "topk.cls_attention", "tome.merge")
CONTROL = "full+ft"
PRIOR = "prior"
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ProtocolRun:
    """One run: a method on a model at a target ratio (1.0 for ``prior``, ``full``, ``full+ft``)."""

    model: str
    method: str
    ratio: float = 1.0
    seed: int = 0

    @property
    def name(self) -> str:
        return point_name(self.model, self.method, self.ratio, self.seed, self.ratio == 1.0)

    @property
    def baseline(self) -> str | None:
        name = self.method.removesuffix("+ft")
        return name if name in BASELINE_NAMES else None

    @property
    def finetuned(self) -> bool:
        return self.method.endswith("+ft")

    @property
    def matched(self) -> "ProtocolRun":
        """The SmartTrim run a baseline is matched to: same model and target, seed 0."""
        return ProtocolRun(self.model, "smarttrim", self.ratio, 0)


@dataclass(frozen=True)
class Protocol:
    """The parsed protocol file (see the module docstring for what each part means)."""

    name: str
    path: str
    digest: str
    models: tuple[str, ...]
    data: str
    splits: dict[str, tuple[int, int]]  # split -> (n, seed)
    ratios: tuple[float, ...]
    seeds: int
    train: dict[str, Any]  # TrainConfig fields of SmartTrim training (and the fine-tuning budget)
    steps: int
    baselines: tuple[str, ...]
    finetune_ratios: tuple[float, ...]
    finetune_seeds: int
    finetune_lr: float  # backbone learning rate of the fine-tuned baselines
    control_seeds: int
    margins: dict[float, float]  # target ratio -> non-inferiority margin in points
    eval_batch: int = 128
    verify: int = 32
    prior_items: int = 20000
    notes: dict[str, str] = field(default_factory=dict)

    def spec(self, split: str, n: int | None = None) -> str:
        """The data spec of one split (`n`: another size on the same seed stream)."""
        size, seed = self.splits[split]
        n = size if n is None else n
        joiner = "&" if "?" in self.data else "?"
        return f"{self.data}{joiner}n={n}&seed={seed}&split={split}"

    def margin(self, ratio: float) -> float:
        for r, m in self.margins.items():
            if math.isclose(r, ratio, rel_tol=1e-3):
                return m
        raise ConfigError(f"protocol {self.name}: no margin for ratio {ratio:g}")

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "digest": self.digest}


def _need(table: dict, key: str, kind, where: str):
    if key not in table:
        raise ConfigError(f"{where}: missing '{key}'")
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _ratios(values, where: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if not out or any(not 0.0 < r < 1.0 for r in out):
        raise ConfigError(f"{where}: ratios must be in (0, 1), got {values!r}")
    return out


def _splits(table: dict, where: str) -> dict[str, tuple[int, int]]:
    out = {}
    for split in _SPLITS:
        part = _need(table, split, dict, where)
        n, seed = _need(part, "n", int, f"{where}.{split}"), _need(part, "seed", int, f"{where}.{split}")
        if n < 1 or seed < 0:
            raise ConfigError(f"{where}.{split}: n must be >= 1 and seed >= 0")
        out[split] = (n, seed)
    return out


def _train_settings(table: dict, where: str) -> dict[str, Any]:
    from trimkit.train import TrainConfig

    known = set(TrainConfig.__dataclass_fields__) - {"seed", "device", "dtype"}
    bad = sorted(set(table) - known - {"ratios", "seeds", "steps"})
    if bad:
        raise ConfigError(f"{where}: unknown training settings {bad}; known: {', '.join(sorted(known))}")
    settings = {k: v for k, v in table.items() if k in known}
    TrainConfig(**settings)  # invalid values fail here, with the field named
    return settings


def _train_config_default(table: dict, name: str):
    from trimkit.train import TrainConfig

    return table.get(name, getattr(TrainConfig(), name))


def load_protocol(path: str | Path) -> Protocol:
    """Parse and check a protocol file (`ConfigError` with the file and key on any problem)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        table = tomllib.loads(raw.decode("utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read protocol {path}: {err.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"protocol {path}: not valid TOML ({err})") from None
    where = str(path)
    smart = _need(table, "smarttrim", dict, where)
    base = table.get("baselines", {})
    controls = table.get("controls", {})
    ratios = _ratios(_need(smart, "ratios", list, f"{where} [smarttrim]"), f"{where} [smarttrim]")
    names = tuple(base.get("methods", BASELINE_NAMES))
    bad = [n for n in names if n not in BASELINE_NAMES]
    if bad:
        raise ConfigError(f"{where} [baselines]: unknown methods {bad}; known: {', '.join(BASELINE_NAMES)}")
    margins = {float(k): float(v) for k, v in _need(table, "margins", dict, where).items()}
    protocol = Protocol(
        name=_need(table, "name", str, where), path=str(path), digest=hashlib.sha256(raw).hexdigest(),
        models=tuple(_need(table, "models", list, where)), data=_need(table, "data", str, where),
        splits=_splits(_need(table, "splits", dict, where), f"{where} [splits]"), ratios=ratios,
        seeds=_need(smart, "seeds", int, f"{where} [smarttrim]"), steps=_need(smart, "steps", int, f"{where} [smarttrim]"),
        train=_train_settings(smart, f"{where} [smarttrim]"), baselines=names,
        finetune_ratios=_ratios(base.get("finetune_ratios", [0.5]), f"{where} [baselines]"),
        finetune_seeds=int(base.get("finetune_seeds", 1)),
        finetune_lr=float(base.get("finetune_lr", _train_config_default(smart, "lr_backbone"))),
        control_seeds=int(controls.get("full_finetune_seeds", 1)),
        margins=margins, eval_batch=int(table.get("eval_batch", 128)), verify=int(table.get("verify", 32)),
        prior_items=int(table.get("prior_items", 20000)),
        notes={k: str(v) for k, v in table.get("notes", {}).items()})
    if not protocol.models:
        raise ConfigError(f"{where}: 'models' is empty")
    for ratio in ratios:
        protocol.margin(ratio)
    if min(protocol.seeds, protocol.steps, protocol.finetune_seeds) < 1 or protocol.control_seeds < 0:
        raise ConfigError(f"{where}: seeds, steps and finetune_seeds must be >= 1, full_finetune_seeds >= 0")
    if protocol.control_seeds and protocol.train.get("freeze_backbone"):
        raise ConfigError(f"{where}: SmartTrim freezes the backbone, so the full model is its own fine-tuning "
                          "control; set [controls] full_finetune_seeds = 0")
    return protocol


def plan(protocol: Protocol) -> list[ProtocolRun]:
    """Every run, in an order where each baseline follows the SmartTrim run it is matched to and
    the runs that carry the most evidence per minute come first."""
    runs: list[ProtocolRun] = []
    for model in protocol.models:
        runs += [ProtocolRun(model, PRIOR), ProtocolRun(model, "full")]
        runs += [ProtocolRun(model, "smarttrim", r, 0) for r in protocol.ratios]
        runs += [ProtocolRun(model, b, r, 0) for r in protocol.ratios for b in protocol.baselines]
        runs += [ProtocolRun(model, "smarttrim", r, s) for s in range(1, protocol.seeds) for r in protocol.ratios]
        runs += [ProtocolRun(model, CONTROL, 1.0, s) for s in range(protocol.control_seeds)]
        runs += [ProtocolRun(model, f"{b}+ft", r, s) for s in range(protocol.finetune_seeds)
                 for r in protocol.finetune_ratios for b in protocol.baselines]
    return runs
