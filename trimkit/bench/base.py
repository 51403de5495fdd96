"""Train, evaluate and cache the full bench models.

:func:`train_base` trains a bench model of one family on one synthetic task, evaluates it on the
validation split and stores the weights (safetensors) and a JSON record (metrics, time, steps,
hyper-parameters) in a cache folder, keyed by a content hash of everything that decides the
weights. A second call with the same arguments loads instead of training.

Training reads every sample once: the train split is generated with ``n = steps * batch_size``
and read in order, so the model never sees a sample twice (the generator is cheap next to a
training step). Cache folder: ``$TRIMKIT_CACHE/bench`` when ``TRIMKIT_CACHE`` is set, else
``~/.cache/trimkit/bench``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from trimkit.bench.backbone import bench_backbone, bench_dataset
from trimkit.bench.models import FAMILIES, ModelConfig, build_model, model_config
from trimkit.data import (COLOURS, SHAPES, SIZES, collate, format_data_spec, metric,
                          parse_data_spec)
from trimkit.errors import ConfigError, DataError
from trimkit.progress import progress as progress_of
from trimkit.train import Batch, Loop, run_loop
from trimkit.train.losses import CrossEntropy

__all__ = ["CODE_VERSION", "TASKS", "BaseTrainConfig", "BenchModel", "cache_root", "default_recipe",
           "data_specs", "cache_key", "train_base", "base_metrics", "train_model", "lr_factor",
           "batch_inputs"]

CODE_VERSION = 1
TASKS: tuple[str, ...] = ("vqa", "truefalse", "retrieval")
SPLITS = ("train", "val", "test")
SCENE_TARGETS: tuple[str, ...] = ("attributes", "full")


@dataclass(frozen=True)
class BaseTrainConfig:
    """Hyper-parameters of base training.

    steps x batch_size fresh training samples; AdamW (betas 0.9/0.98, weight decay on matrices
    only) with a linear warm-up over ``warmup`` steps and a cosine decay to ``min_lr_ratio * lr``;
    gradients clipped at ``grad_clip``; ``val_n`` / ``test_n`` samples in the evaluation splits.
    ``single_object_steps``: the first steps read one-object scenes of the same task (a perception
    curriculum: which object a question means can only be learnt once shapes are recognised).
    ``scene_weight``: weight of an auxiliary loss on the image tokens (BLIP and BridgeTower): a
    linear probe, trained with the model and dropped afterwards, reads the colour, shape and size
    of the object in each patch's grid cell (or "none") from the image stream's last layer. It
    gives the vision side dense targets, so that objects are recognised before the text side has
    learnt to pick one. ``scene_targets``: ``attributes``, or ``full`` (also each object's grid row
    and column, and on every patch the scene's count of each shape and colour; see `scene_targets`).
    """

    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 300
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    init_std: float = 0.02
    val_n: int = 1000
    test_n: int = 1000
    eval_batch_size: int = 128
    single_object_steps: int = 0
    scene_weight: float = 0.0
    scene_targets: str = "attributes"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "val_n", "test_n", "eval_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not isinstance(self.single_object_steps, int) or not 0 <= self.single_object_steps < self.steps:
            raise ConfigError(f"single_object_steps must be in 0..steps-1 ({self.steps - 1}), "
                              f"got {self.single_object_steps!r}")
        if not self.scene_weight >= 0:
            raise ConfigError(f"scene_weight must be >= 0, got {self.scene_weight}")
        if self.scene_targets not in SCENE_TARGETS:
            raise ConfigError(f"unknown scene_targets {self.scene_targets!r}; known: {', '.join(SCENE_TARGETS)}")


# Default recipes (see trimkit/bench/README.md for what they reach): 8-pixel patches on 64-pixel
# images (64 patch tokens, each object covering about 2x2 of them), 2-3 objects per scene centred in
# the cells of the scene grid, batch 32, and a one-object curriculum for the first 1500 steps.
_SIZE: dict = dict(hidden=128, layers=4, heads=4, patch=8)
_TRAIN: dict = dict(batch_size=32, lr=1e-3, warmup=300, single_object_steps=1500)
_STEPS: dict = {("blip", "vqa"): 4000, ("bridgetower", "vqa"): 4000, ("vilt", "vqa"): 5000}
_DEFAULT_STEPS = 5000
_DATA = "synthetic:{task}?image=64&objects=2-3&jitter=0"
_RECIPES: dict[tuple[str, str], tuple[dict, dict, str]] = {
    (family, task): ({**_SIZE, **({"cross_layers": 2} if family == "bridgetower" else {})},
                     {**_TRAIN, "steps": _STEPS.get((family, task), _DEFAULT_STEPS)}, _DATA)
    for family in FAMILIES for task in ("vqa", "truefalse", "retrieval")
}


def default_recipe(family: str, task: str) -> tuple[dict, BaseTrainConfig, str]:
    """The model-size overrides, the `BaseTrainConfig` and the data spec used for `family` on `task`."""
    _check(family, task)
    size, train, data = _RECIPES[(family, task)]
    return dict(size), BaseTrainConfig(**train), data.format(task=task)


def _check(family: str, task: str) -> None:
    if family not in FAMILIES:
        raise ConfigError(f"unknown bench family {family!r}; known: {', '.join(FAMILIES)}")
    if task not in TASKS:
        raise ConfigError(f"unknown bench task {task!r}; known: {', '.join(TASKS)}")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$TRIMKIT_CACHE/bench``, else ``~/.cache/trimkit/bench``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TRIMKIT_CACHE")
    if env:
        return Path(env).expanduser() / "bench"
    return Path.home() / ".cache" / "trimkit" / "bench"


def data_specs(task: str, train: BaseTrainConfig, data_spec: str | None = None) -> dict[str, str]:
    """Canonical train/val/test specs: `data_spec` (default ``synthetic:<task>``) with ``n`` set to
    ``steps * batch_size`` / ``val_n`` / ``test_n`` and the split set."""
    spec = parse_data_spec(data_spec or f"synthetic:{task}")
    if spec.source != "synthetic":
        raise DataError(f"bench base training needs a synthetic data spec, got {data_spec!r}")
    if spec.task != task:
        raise DataError(f"data spec {data_spec!r} is for task {spec.task!r}, not {task!r}")
    sizes = {"train": train.steps * train.batch_size, "val": train.val_n, "test": train.test_n}
    out = {split: format_data_spec(replace(spec, split=split, n=n)) for split, n in sizes.items()}
    if train.single_object_steps:  # its own seed stream: no scene shared with the main train split
        out["single_object"] = format_data_spec(replace(
            spec, split="train", seed=spec.seed + 1, n=train.single_object_steps * train.batch_size,
            extra={**spec.extra, "objects": (1, 1)}))
    return out


def cache_key(family: str, task: str, config: ModelConfig, specs: dict[str, str], train: BaseTrainConfig,
              seed: int) -> str:
    """Hex digest of everything that decides the trained weights."""
    recipe = asdict(train)
    for name in ("single_object_steps", "scene_weight"):  # keys of runs from before the fields stay valid
        if not recipe[name]:
            del recipe[name]
    if recipe["scene_targets"] == "attributes":
        del recipe["scene_targets"]
    payload = {"family": family, "task": task, "model": config.to_dict(), "data": specs,
               "train": recipe, "seed": seed, "version": CODE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _metric_task(task: str) -> str:
    return "itm" if task == "retrieval" else task


@dataclass
class BenchModel:
    """A trained bench model: the module (eval mode) and what it was trained and measured on.

    data: split -> canonical data spec; metrics: ``{"val": {"accuracy": ...}, ...}``; record: the
    JSON stored next to the weights. :meth:`backbone` wraps it for the rest of trimkit.
    """

    family: str
    task: str
    model: nn.Module
    config: ModelConfig
    train: BaseTrainConfig
    seed: int
    data: dict[str, str]
    num_labels: int
    metrics: dict
    path: Path
    record: dict = field(default_factory=dict)
    loaded: bool = False

    @property
    def name(self) -> str:
        return f"bench-{self.family}-{self.task}"

    @property
    def metric_task(self) -> str:
        """The task name :func:`trimkit.data.metric` reads this model's logits with."""
        return _metric_task(self.task)

    def dataset(self, split: str = "val"):
        """The data set of `split` (retrieval: image-text matching pairs)."""
        if split not in self.data:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(self.data)}")
        return bench_dataset(self.data[split], self.task)

    def backbone(self):
        """This model as a `trimkit.backbones.base.Backbone` (see :mod:`trimkit.bench.backbone`)."""
        return bench_backbone(self)


# ----------------------------------------------------------------------------- training


def _batches(dataset, batch_size: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    for lo in range(start, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))])


def batch_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", "scene")}


# ----------------------------------------------------------------------------- scene targets

_COLOUR_INDEX = {name: i for i, name in enumerate(COLOURS)}
_COUNTS = 6  # a scene holds 0..5 objects of one shape or colour


def scene_classes(kind: str = "attributes", grid: int = 4) -> tuple[int, ...]:
    """Class counts of the columns of `scene_targets`."""
    attrs = (len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES) + 1)
    if kind == "attributes":
        return attrs
    return (*attrs, grid + 1, grid + 1, *([_COUNTS] * (len(SHAPES) + len(COLOURS))))


def scene_targets(objects, image: int, patch: int, grid: int, kind: str = "attributes") -> torch.Tensor:
    """``[P, K]`` long, patches in row-major order. ``attributes`` (K = 3): colour, shape and size
    index + 1 of the object in the grid cell that holds the patch's centre, 0 where that cell is
    empty. ``full`` adds that object's grid row + 1 and column + 1 (0 where empty), and on every
    patch the number of objects of each shape and of each colour in the scene."""
    side = image // patch
    cells = ((torch.arange(side) + 0.5) * patch * grid / image).long().clamp(max=grid - 1)
    width = 5 if kind == "full" else 3
    table = torch.zeros(grid, grid, width, dtype=torch.long)
    for obj in objects:
        row = [_COLOUR_INDEX[obj.colour] + 1, SHAPES.index(obj.shape) + 1, SIZES.index(obj.size) + 1]
        table[obj.row, obj.col] = torch.tensor(row + ([obj.row + 1, obj.col + 1] if kind == "full" else []))
    out = table[cells[:, None], cells[None, :]].reshape(side * side, width)
    if kind != "full":
        return out
    counts = [sum(o.shape == v for o in objects) for v in SHAPES] + [sum(o.colour == v for o in objects)
                                                                      for v in COLOURS]
    counts_t = torch.tensor(counts, dtype=torch.long).clamp(max=_COUNTS - 1)
    return torch.cat([out, counts_t.expand(side * side, -1)], dim=1)


def _parts(dataset) -> list:
    return list(dataset.datasets) if isinstance(dataset, torch.utils.data.ConcatDataset) else [dataset]


def _scene_parts(dataset) -> list:
    parts = _parts(dataset)
    for part in parts:
        source = getattr(part, "source", None)
        if not hasattr(source, "grid"):
            raise ConfigError(f"scene_weight needs synthetic scenes; {type(part).__name__} has none "
                              f"(the retrieval task's matching pairs included)")
    return parts


def _scene_batches(dataset, batch_size: int, patch: int, kind: str) -> Iterator[dict[str, torch.Tensor]]:
    """Like `_batches`, with each item's `scene_targets` under ``"scene"``."""
    items = []
    for part in _scene_parts(dataset):
        for i in range(len(part)):
            rec = part.record(i)
            item = part.encode_item(rec.image, rec.text, rec.label)
            item["scene"] = scene_targets(rec.objects, part.image_size, patch, part.source.grid, kind)
            items.append(item)
            if len(items) == batch_size:
                yield collate(items)
                items = []
    if items:
        yield collate(items)


class _SceneProbe(nn.Module):
    """Reads the image stream's last-layer patch tokens of a BLIP or BridgeTower bench model (through
    a forward hook) and scores them against their `scene_targets`."""

    def __init__(self, model: nn.Module, classes: tuple[int, ...]):
        super().__init__()
        family = getattr(getattr(model, "config", None), "family", None)
        if family == "blip":
            module = model.vision_model
        elif family == "bridgetower":
            module = model.bridgetower.vision_model.visual.transformer.resblocks[-1]
        else:
            raise ConfigError(f"scene_weight works on BLIP and BridgeTower bench models, not {family!r} "
                              f"(ViLT shuffles its patch tokens)")
        self.seq_first = family == "bridgetower"  # its vision blocks run [tokens, batch, hidden]
        self.classes = tuple(classes)
        self.heads = nn.Linear(model.config.hidden, sum(self.classes))
        self._states: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        states = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", output)
        if self.seq_first:
            states = states.transpose(0, 1)
        self._states = states[:, 1:]  # drop the image [CLS]

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        if self._states is None or self._states.shape[:2] != targets.shape[:2]:
            raise ConfigError("the scene probe did not see the image tokens of this batch")
        logits = self.heads(self._states.float()).split(self.classes, dim=-1)
        self._states = None
        return sum(F.cross_entropy(z.flatten(0, 1), targets[..., k].flatten())
                   for k, z in enumerate(logits)) / len(logits)

    def remove(self) -> None:
        self._handle.remove()


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, train: BaseTrainConfig) -> float:
    """Learning-rate multiplier at `step`: linear warm-up, then cosine down to ``min_lr_ratio``."""
    if step < train.warmup:
        return (step + 1) / train.warmup
    progress = (step - train.warmup) / max(1, train.steps - train.warmup)
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def base_metrics(model: nn.Module, dataset, task: str, batch_size: int = 128) -> dict:
    """``{metric_name: value, "loss": mean cross-entropy, "n": samples}`` of `model` on `dataset`."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in _batches(dataset, batch_size):
            logits.append(model(**batch_inputs(batch)).logits.float())
            labels.append(batch["labels"])
    finally:
        model.train(was_training)
    logits_t, labels_t = torch.cat(logits), torch.cat(labels)
    name, value = metric(_metric_task(task), logits_t, labels_t)
    return {name: value, "loss": float(F.cross_entropy(logits_t, labels_t)), "n": int(labels_t.numel())}


@dataclass
class SceneLoss:
    """The scene probe's loss on the batch's ``scene`` targets (a loss term of the training loop)."""

    probe: _SceneProbe
    weight: float
    name: str = "scene"

    def __call__(self, outputs, batch: Batch) -> torch.Tensor:
        return self.probe.loss(batch.extra["scene"])


def _forward(model: nn.Module, batch: Batch) -> SimpleNamespace:
    return SimpleNamespace(student=model(**batch.inputs))


def _loop_batches(batches: Iterator[dict]) -> Callable[[int], Batch]:
    """The collated batches of `batches`, in order, as the loop's batch source."""
    def next_batch(m: int) -> Batch:
        batch = next(batches)
        extra = {"scene": batch["scene"]} if "scene" in batch else {}
        return Batch(batch_inputs(batch), batch["labels"], extra)
    return next_batch


class _LossLog:
    """The mean loss of every `every` steps (the task's cross-entropy; the scene loss on its own) and
    the progress bar."""

    def __init__(self, steps: int, every: int, bar, task_id, log: Callable[[int, float], None] | None):
        self.steps, self.every, self.bar, self.task_id, self.log = steps, every, bar, task_id, log
        self.losses: list[float] = []
        self.window: list[float] = []
        self.scene: list[float] = []

    def __call__(self, step: int, row: dict) -> None:
        self.window.append(row["task"])
        if "scene" in row:
            self.scene.append(row["scene"])
        if len(self.window) == self.every or step == self.steps - 1:
            self.losses.append(sum(self.window) / len(self.window))
            self.window = []
            if self.log is not None:
                self.log(step + 1, self.losses[-1])
        window = self.window[-20:]
        loss = sum(window) / len(window) if window else self.losses[-1]
        self.bar.advance(self.task_id, info=f"loss {loss:.3f}")

    def scene_means(self) -> list[float]:
        every = self.every
        return [sum(self.scene[i:i + every]) / len(self.scene[i:i + every]) for i in range(0, len(self.scene), every)]


def train_model(model: nn.Module, train_set, train: BaseTrainConfig, *, description: str = "train",
                progress: bool = True, log: Callable[[int, float], None] | None = None,
                log_every: int = 100) -> dict:
    """Train `model` in place on `train_set` read in order; returns ``{"losses": [...], "seconds": s}``
    with the mean loss of every `log_every` steps (and ``cpu_seconds``, the process CPU time)."""
    probe = None
    if train.scene_weight:  # the parts are checked for scenes before the probe hooks the model
        grid = max(part.source.grid for part in _scene_parts(train_set))
        probe = _SceneProbe(model, scene_classes(train.scene_targets, grid))
    params = _param_groups(model, train.weight_decay) + (_param_groups(probe, train.weight_decay) if probe else [])
    optimizer = torch.optim.AdamW(params, lr=train.lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, train))
    model.train()
    batches = _scene_batches(train_set, train.batch_size, model.config.patch, train.scene_targets) if probe else \
        _batches(train_set, train.batch_size)
    terms = [CrossEntropy(label_smoothing=train.label_smoothing)] + ([SceneLoss(probe, train.scene_weight)]
                                                                     if probe is not None else [])
    loop = Loop(model, optimizer, _loop_batches(batches), _forward, terms,
                clip=(list(model.parameters()), train.grad_clip), schedule=schedule)
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        with progress_of(progress) as bar:
            logged = _LossLog(train.steps, log_every, bar, bar.add(description, train.steps), log)
            run_loop(loop, train.steps, after_step=logged)
    finally:
        if probe is not None:
            probe.remove()
    out = {"losses": logged.losses, "seconds": time.perf_counter() - start,
           "cpu_seconds": time.process_time() - cpu_start}
    if probe is not None:  # the scene loss's mean over every log_every steps
        out["scene_losses"] = logged.scene_means()
    return out


# ----------------------------------------------------------------------------- cache


def _paths(root: Path, family: str, task: str, key: str) -> tuple[Path, Path]:
    stem = f"{family}-{task}-{key[:16]}"
    return root / f"{stem}.safetensors", root / f"{stem}.json"


def _save(model: nn.Module, record: dict, weights: Path, meta: Path) -> None:
    from safetensors.torch import save_model

    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_m = weights.with_suffix(".tmp.safetensors"), meta.with_suffix(".tmp.json")
    save_model(model, str(tmp_w), metadata={"key": record["key"]})
    tmp_m.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp_w, weights)
    os.replace(tmp_m, meta)


def _load(model: nn.Module, weights: Path) -> None:
    from safetensors.torch import load_model

    missing, unexpected = load_model(model, str(weights), strict=False)
    if missing or unexpected:
        raise ConfigError(f"cached weights {weights} do not fit the model: missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}; delete the file to retrain")


def train_base(family: str, task: str = "vqa", *, seed: int = 0, steps: int | None = None,
               data_spec: str | None = None, cache_dir: str | os.PathLike | None = None, progress: bool = True,
               model: dict | None = None, train: BaseTrainConfig | dict | None = None,
               evaluate_test: bool = False, threads: int | None = 2, retrain: bool = False) -> BenchModel:
    """Train (or load from the cache) the full bench model of `family` on `task`.

    family: ``blip``, ``bridgetower`` or ``vilt``; task: ``vqa``, ``truefalse`` or ``retrieval``
    (image-text matching pairs). seed: weight initialisation. steps: overrides the recipe's step
    count (the one-object curriculum keeps its share of the steps unless `train` sets it).
    data_spec: a ``synthetic:<task>?...`` spec (its ``n`` and ``split`` are replaced).
    model / train: overrides of the model size / the `BaseTrainConfig` (a dict updates the recipe's).
    evaluate_test: also measure the test split. threads: ``torch.set_num_threads`` during training
    (None leaves it). retrain: ignore a cached result.
    """
    _check(family, task)
    size, recipe, default_data = default_recipe(family, task)
    size.update(model or {})
    if isinstance(train, BaseTrainConfig):
        recipe, changes = train, {}
    else:
        changes = dict(train or {})
    if steps is not None:  # in one step with the overrides, which may only fit the new count
        changes.update(steps=steps, warmup=min(changes.get("warmup", recipe.warmup), max(1, steps // 10)))
    if "steps" in changes and "single_object_steps" not in changes:  # the curriculum keeps its share
        changes["single_object_steps"] = recipe.single_object_steps * changes["steps"] // recipe.steps
    if changes:
        recipe = replace(recipe, **changes)
    specs = data_specs(task, recipe, data_spec or default_data)
    probe = bench_dataset(replace(parse_data_spec(specs["val"]), n=1), task)
    config = model_config(family, probe.base if task == "retrieval" else probe, **size)
    key = cache_key(family, task, config, specs, recipe, seed)
    weights, meta = _paths(cache_root(cache_dir), family, task, key)
    net = build_model(config, seed=seed, init_std=recipe.init_std)
    if weights.is_file() and meta.is_file() and not retrain:
        _load(net, weights)
        record = json.loads(meta.read_text(encoding="utf-8"))
        return BenchModel(family, task, net.eval(), config, recipe, seed, specs, config.num_labels,
                          dict(record.get("metrics", {})), weights, record, loaded=True)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            train_set = bench_dataset(specs["train"], task)
            if "single_object" in specs:
                train_set = torch.utils.data.ConcatDataset([bench_dataset(specs["single_object"], task), train_set])
            history = train_model(net, train_set, recipe,
                                  description=f"{family} {task}", progress=progress)
            metrics = {"val": base_metrics(net, bench_dataset(specs["val"], task), task, recipe.eval_batch_size)}
            if evaluate_test:
                metrics["test"] = base_metrics(net, bench_dataset(specs["test"], task), task, recipe.eval_batch_size)
    finally:
        torch.set_num_threads(old_threads)
    record = {"key": key, "family": family, "task": task, "seed": seed, "model": config.to_dict(),
              "train": asdict(recipe), "data": specs, "metrics": metrics, "steps": recipe.steps,
              "train_seconds": round(history["seconds"], 2),
              "train_cpu_seconds": round(history.get("cpu_seconds", 0.0), 2),
              "losses": [round(x, 4) for x in history["losses"]],
              **({"scene_losses": [round(x, 4) for x in history["scene_losses"]]} if "scene_losses" in history else {}),
              "threads": threads, "version": CODE_VERSION, "torch": torch.__version__}
    _save(net, record, weights, meta)
    return BenchModel(family, task, net.eval(), config, recipe, seed, specs, config.num_labels, metrics,
                      weights, record, loaded=False)
