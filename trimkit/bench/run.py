"""The trimming benchmark: SmartTrim against training-free baselines at matched executed FLOPs.

:func:`plan` lists the runs of a :class:`BenchConfig`; :func:`run_bench` trains (or loads) the full
model of every family/task, then executes each run and writes one JSON file per run into the output
folder as soon as it finishes. A run whose JSON already exists with the same ``config_hash`` is
skipped, so an interrupted bench resumes where it stopped.

Runs per (family, task):

* ``full``: the base model, untrimmed.
* ``smarttrim``: tokens + heads, trained with :func:`trimkit.train.train` (task + self-distillation
  + cost loss) to the executed-FLOPs ratios of ``BenchConfig.ratios``; the inference threshold is
  calibrated on training items.
* ``random.tokens``, ``topk.cls_attention``, ``tome.merge``: training-free, calibrated at apply time to
  the executed-FLOPs ratio SmartTrim measured on validation items at the same target (matched FLOPs);
  ``+ft`` variants are then fine-tuned for the same number of steps as SmartTrim.
* ablations at the 2x target: ``smarttrim-self`` (no cross-modal guidance), ``smarttrim-nodistill``
  (``alpha = 0``), ``smarttrim-tokens`` and ``smarttrim-heads`` (one pass only).

Accuracy comes from the test split; every choice (thresholds, matched ratios) from train/val.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from trimkit.bench.backbone import bench_backbone
from trimkit.bench.base import TASKS, train_base
from trimkit.bench.models import FAMILIES
from trimkit.runtime import trimming_off
from trimkit.data import collate
from trimkit.device import DTYPES, autocast, resolve_device, resolve_dtype
from trimkit.errors import ConfigError
from trimkit.evaluate import evaluate, executed_ratio
from trimkit.passes import apply_
from trimkit.passes.random_tokens import RandomTokensConfig
from trimkit.passes.smarttrim import SmartTrimTokensConfig
from trimkit.passes.smarttrim_heads import SmartTrimHeadsConfig
from trimkit.passes.tome import ToMeMergeConfig
from trimkit.passes.topk import TopKClsAttentionConfig
from trimkit.tasks import binding_for, model_batch
from trimkit.train import Batch, Loop, TrainConfig, run_loop, train
from trimkit.train.losses import CrossEntropy, Distillation

__all__ = ["BenchConfig", "RunSpec", "QUICK", "SMOKE", "plan", "run_bench", "run_one", "environment",
           "finetune", "length_batches", "baseline_config", "point_name", "BASELINES", "ABLATIONS", "fresh_copy", "smarttrim_configs", "train_config",
           "items_of"]

FORMAT = 1
BASELINES: tuple[str, ...] = ("random.tokens", "topk.cls_attention", "tome.merge")
ABLATIONS: tuple[str, ...] = ("smarttrim-self", "smarttrim-nodistill", "smarttrim-tokens", "smarttrim-heads")
_TWO_X = 0.5


@dataclass(frozen=True)
class BenchConfig:
    """What the bench runs.

    families / tasks: bench models (``trimkit.bench.FAMILIES``) and synthetic tasks.
    ratios: SmartTrim targets (executed-FLOPs ratio; 1/1.5, 1/2, 1/3 by default).
    seeds: seeds of the 2x points (SmartTrim, baselines, ablations); other ratios use seed 0 only
      unless ``all_seeds``.
    base_steps: steps of base training (None: the recipe's); base_model / base_train: overrides of
      the base model's size and `trimkit.bench.BaseTrainConfig`; base_data: the synthetic data spec of
      base training (None: the recipe's; ``{task}`` is replaced by the task).
    steps: SmartTrim training steps, also the fine-tuning budget of the ``+ft`` baselines.
    batch_size: rows per training step; lr_backbone / lr_trimmer / alpha / beta: trainer settings;
      freeze_backbone: SmartTrim trains its trimmers only; full_task: weight of the full-capacity
      pass's task loss in SmartTrim training; dual_lr: step of the Lagrange multiplier that holds
      the FLOPs ratio to its target; logit_penalty / logit_margin: the penalty on keep-logits beyond
      the margin; undershoot: training aims this far below the target (see `trimkit.train.TrainConfig`).
    finetune: also run the baselines after fine-tuning; ablations: run the four ablations (at 2x, or
      at every ratio with ``ablations_all``); methods: run only these methods (empty: all planned).
    calibrate: training items that pick SmartTrim's inference threshold.
    match_items: validation items on which SmartTrim's executed ratio is measured for matching.
    flops_samples: test items whose executed FLOPs are counted one by one.
    latency_batch / latency_repeats: the large latency batch and the timed repeats per model.
    device / threads: where the bench runs (``cpu``, ``cuda``, ``cuda:N``, ``mps``) and ``torch.set_num_threads``.
    dtype: precision of SmartTrim training, baseline fine-tuning and evaluation (``float32``,
      ``bfloat16``, ``float16``; :mod:`trimkit.device`: trimmers stay float32).
    cache_dir: the base-model cache (None: `trimkit.bench.cache_root`).
    """

    families: tuple[str, ...] = ("blip", "bridgetower", "vilt")
    tasks: tuple[str, ...] = ("vqa", "truefalse")
    ratios: tuple[float, ...] = (2 / 3, 1 / 2, 1 / 3)
    seeds: int = 3
    all_seeds: bool = False
    base_steps: int | None = None
    base_model: tuple[tuple[str, Any], ...] = ()
    base_train: tuple[tuple[str, Any], ...] = ()
    base_data: str | None = None
    steps: int = 300
    batch_size: int = 32
    lr_backbone: float = 1e-5
    freeze_backbone: bool = False
    full_task: float = 0.0
    dual_lr: float = 0.0
    logit_penalty: float = 0.0
    undershoot: float = 0.0
    logit_margin: float = 4.0
    lr_trimmer: float = 1e-2
    alpha: float = 1.0
    beta: float = 10.0
    finetune: bool = True
    ablations: bool = True
    ablations_all: bool = False
    methods: tuple[str, ...] = ()
    calibrate: int = 256
    match_items: int = 32
    flops_samples: int = 64
    latency_batch: int = 32
    latency_repeats: int = 10
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 2
    cache_dir: str | None = None
    mode: str = "full"

    def __post_init__(self) -> None:
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise ConfigError(f"unknown bench families {bad or 'none'}; known: {', '.join(FAMILIES)}")
        bad = [t for t in self.tasks if t not in TASKS or t == "retrieval"]
        if bad or not self.tasks:
            raise ConfigError(f"unknown bench tasks {bad or 'none'}; known: vqa, truefalse")
        if not self.ratios or any(not 0.0 < r < 1.0 for r in self.ratios):
            raise ConfigError(f"ratios must be in (0, 1), got {self.ratios}")
        for name in ("seeds", "steps", "batch_size", "flops_samples", "latency_batch", "latency_repeats",
                     "threads", "match_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        known = ("full", "smarttrim", *BASELINES, *(f"{b}+ft" for b in BASELINES), *ABLATIONS)
        bad = [m for m in self.methods if m not in known]
        if bad:
            raise ConfigError(f"unknown bench methods {bad}; known: {', '.join(known)}")
        kind, _, index = str(self.device).partition(":")
        if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
            raise ConfigError(f"device must be 'cpu' or 'cuda' (or 'cuda:N', 'mps'), got {self.device!r}")
        resolve_device(self.device)  # one line when the machine lacks it
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["base_model"] = dict(self.base_model)
        data["base_train"] = dict(self.base_train)
        return data


# A reduced bench: one small ViLT on VQA, 2x only, baselines training-free, one seed. Its base is
# small and quick: 16-pixel patches (16 image tokens), jittered objects, no curriculum.
_SMALL_DATA = "synthetic:{task}?image=64&objects=2-3"
QUICK = BenchConfig(families=("vilt",), tasks=("vqa",), ratios=(0.5,), seeds=1, base_steps=200,
                    base_model=(("hidden", 64), ("heads", 2), ("patch", 16)),
                    base_train=(("val_n", 100), ("test_n", 200), ("single_object_steps", 0), ("warmup", 200)),
                    base_data=_SMALL_DATA,
                    steps=40, finetune=False, ablations=False, calibrate=64, match_items=8,
                    flops_samples=12, latency_repeats=5, mode="quick")

# The same pipeline with a handful of steps and tiny data (CI).
SMOKE = BenchConfig(families=("vilt",), tasks=("vqa",), ratios=(0.5,), seeds=1, base_steps=4,
                    base_model=(("hidden", 32), ("heads", 2), ("layers", 3), ("patch", 16)),
                    base_train=(("val_n", 16), ("test_n", 16), ("batch_size", 8), ("eval_batch_size", 16),
                                ("single_object_steps", 0), ("warmup", 200)),
                    base_data=_SMALL_DATA,
                    steps=3, batch_size=8, finetune=True, ablations=False, calibrate=16, match_items=2,
                    flops_samples=2, latency_batch=4, latency_repeats=1, threads=1, mode="smoke")


def point_name(prefix: str, method: str, ratio: float, seed: int, whole: bool) -> str:
    """``PREFIX-METHOD[-rNNNN]-sSEED``: the file stem of one bench point (no ratio tag when `whole`)."""
    tag = method if whole else f"{method}-r{round(ratio * 1000):04d}"
    return f"{prefix}-{tag}-s{seed}"


@dataclass(frozen=True)
class RunSpec:
    """One point of the bench: a method at a target ratio with a seed (``ratio`` 1.0 for ``full``)."""

    family: str
    task: str
    method: str
    ratio: float = 1.0
    seed: int = 0

    @property
    def name(self) -> str:
        return point_name(f"{self.family}-{self.task}", self.method, self.ratio, self.seed, self.method == "full")

    @property
    def trained(self) -> bool:
        return self.method.startswith("smarttrim")

    @property
    def baseline(self) -> str | None:
        name = self.method.removesuffix("+ft")
        return name if name in BASELINES else None


def _seeds_for(config: BenchConfig, ratio: float) -> range:
    return range(config.seeds) if config.all_seeds or math.isclose(ratio, _TWO_X) else range(1)


def plan(config: BenchConfig) -> list[RunSpec]:
    """Every run of `config`, in execution order (a baseline after the SmartTrim run it matches)."""
    runs: list[RunSpec] = []
    for family in config.families:
        for task in config.tasks:
            runs.append(RunSpec(family, task, "full"))
            for ratio in config.ratios:
                for seed in _seeds_for(config, ratio):
                    runs.append(RunSpec(family, task, "smarttrim", ratio, seed))
                    for name in BASELINES:
                        runs.append(RunSpec(family, task, name, ratio, seed))
                        if config.finetune:
                            runs.append(RunSpec(family, task, f"{name}+ft", ratio, seed))
            if config.ablations:
                for ratio in (config.ratios if config.ablations_all else (_TWO_X,)):
                    for seed in _seeds_for(config, ratio):
                        runs += [RunSpec(family, task, name, ratio, seed) for name in ABLATIONS]
    if config.methods:
        runs = [r for r in runs if r.method in config.methods]
    return runs


# ----------------------------------------------------------------------------------------------
# Environment and hashes
# ----------------------------------------------------------------------------------------------
def git_revision(root: str | os.PathLike | None = None) -> str:
    """``git rev-parse HEAD`` of the checkout holding this file ("unknown" outside a git checkout)."""
    where = Path(root) if root is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def environment(config: BenchConfig) -> dict:
    """Versions, threads, device and git revision recorded in every result."""
    import transformers

    device = resolve_device(config.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": config.threads, "device": config.device, "dtype": config.dtype, "device_name": name, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "git_revision": git_revision()}


def config_hash(config: BenchConfig, run: RunSpec, base_key: str) -> str:
    """Digest of everything that decides one run's result (not the environment)."""
    data = config.to_dict()
    for key in ("families", "tasks", "ratios", "seeds", "all_seeds", "finetune", "ablations", "ablations_all",
                "methods", "cache_dir", "mode"):
        data.pop(key)
    if not data["logit_penalty"]:  # off: the same runs as before the option existed
        del data["logit_penalty"], data["logit_margin"]
    if not data["undershoot"]:
        del data["undershoot"]
    if data["dtype"] == "float32":
        del data["dtype"]
    payload = {"config": data, "run": dataclasses.asdict(run), "base": base_key, "format": FORMAT}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_result(path: Path) -> dict | None:
    """A result JSON, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _existing(path: Path, digest: str) -> dict | None:
    data = _read_result(path)
    return data if data is not None and data.get("config_hash") == digest else None


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def base_model(config: BenchConfig, family: str, task: str, progress: bool = False):
    """The trained full model of `family` on `task` (`trimkit.bench.BenchModel`, from the cache)."""
    data = config.base_data.format(task=task) if config.base_data else None
    return train_base(family, task, seed=0, steps=config.base_steps, cache_dir=config.cache_dir,
                      model=dict(config.base_model), train=dict(config.base_train), progress=progress,
                      data_spec=data, threads=config.threads)


def fresh_copy(bench, device: str):
    """A copy of `bench` whose model can be changed in place (passes, training), on `device`."""
    model = copy.deepcopy(bench.model).to(device).eval()
    return bench_backbone(replace(bench, model=model))


def smarttrim_configs(method: str, ratio: float) -> list:
    guidance = "self" if method == "smarttrim-self" else "cross"
    tokens = SmartTrimTokensConfig(target_ratio=ratio, guidance=guidance)
    heads = SmartTrimHeadsConfig(target_ratio=ratio)
    if method == "smarttrim-tokens":
        return [tokens]
    if method == "smarttrim-heads":
        return [heads]
    return [tokens, heads]


def train_config(config: BenchConfig, run: RunSpec) -> TrainConfig:
    """The SmartTrim training settings of `run`: every `TrainConfig` field the bench configuration
    also has, the run's seed, no distillation for ``smarttrim-nodistill``, no periodic measurement."""
    shared = {f.name for f in dataclasses.fields(BenchConfig)}
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig) if f.name in shared}
    if run.method == "smarttrim-nodistill":
        values["alpha"] = 0.0
    return TrainConfig(**values, seed=run.seed, measure_every=0)


def items_of(bench, split: str, count: int) -> list[dict]:
    data = bench.dataset(split)
    return [data[i] for i in range(min(count, len(data)))]


def length_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Indices grouped into full batches of one text length each, in an order seeded by `seed`
    (items left over in a length group are dropped)."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    chunks = [g[lo:lo + batch_size] for _, g in sorted(groups.items()) for lo in range(0, len(g) - batch_size + 1,
                                                                                          batch_size)]
    if not chunks:
        raise ConfigError(f"no text length has {batch_size} items; use a smaller batch size or more data")
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed)).tolist()
    return [chunks[i] for i in order]


class _FinetuneOutputs:
    """The teacher's logits (the same model with trimming off, eval mode, no gradient), then the
    trimmed forward in training mode."""

    def __init__(self, model: torch.nn.Module, batch: Batch, distill: bool):
        self._teacher = None
        if distill:
            model.eval()
            with torch.no_grad(), trimming_off(model):
                self._teacher = model(**batch.inputs).logits.float()
        model.train()
        self.student = model(**batch.inputs)

    def teacher_logits(self) -> torch.Tensor:
        return self._teacher


def _logits(out) -> torch.Tensor:
    return out.logits.float()


def finetune(model: torch.nn.Module, binding, dataset, *, steps: int, batch_size: int, lr: float, alpha: float,
             seed: int, device: str, dtype: str = "float32") -> list[float]:
    """Fine-tune every parameter of `model` (a training-free pass applied) for `steps` steps: task
    cross-entropy + `alpha` x distillation from the same model with trimming off, AdamW at `lr`.
    Batches hold one text length each (no padding, as in evaluation), drawn from the first
    ``2 * steps * batch_size`` items in an order seeded by `seed`. `dtype`: the forward's precision
    (autocast; weights stay float32, float16 with loss scaling). Returns the loss of each step."""
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    items = [dataset[i] for i in range(min(len(dataset), 2 * steps * batch_size))]
    batches = length_batches([int(it["input_ids"].shape[-1]) for it in items], batch_size, seed)

    def batch(step: int) -> Batch:
        return Batch(*model_batch(binding, collate([items[i] for i in batches[step % len(batches)]]), device))

    terms = [CrossEntropy(logits=_logits)] + ([Distillation(alpha, logits=_logits)] if alpha > 0 else [])
    where, precision = resolve_device(device), resolve_dtype(dtype)
    scaler = torch.amp.GradScaler(where.type) if precision == torch.float16 else None
    loop = Loop(model, opt, batch, lambda m, b: _FinetuneOutputs(m, b, alpha > 0), terms, clip=(params, 1.0),
                context=lambda m: autocast(where, precision), scaler=scaler)
    rows = run_loop(loop, steps)
    model.eval()
    return [row["loss"] for row in rows]


def baseline_config(name: str, flops_ratio: float, seed: int):
    """The config of training-free baseline `name` calibrated to `flops_ratio` (`seed`: random.tokens)."""
    if name == "random.tokens":
        return RandomTokensConfig(flops_ratio=flops_ratio, seed=seed)
    if name == "topk.cls_attention":
        return TopKClsAttentionConfig(flops_ratio=flops_ratio)
    return ToMeMergeConfig(flops_ratio=flops_ratio)


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------
def _evaluate(backbone, bench, config: BenchConfig, latency: bool = True) -> dict:
    return evaluate(backbone, bench.data["test"], batch_size=64, samples=config.flops_samples, latency=latency,
                    latency_batch=config.latency_batch, threads=config.threads, repeats=config.latency_repeats,
                    split="test", device=config.device, dtype=config.dtype)


def _val_accuracy(backbone, bench, config: BenchConfig) -> float:
    """The run's metric on the validation split: what settings may be chosen on (the test split is
    reported, never tuned on)."""
    report = evaluate(backbone, bench.data["val"], batch_size=64, samples=1, latency=False,
                      threads=config.threads, split="val", device=config.device, dtype=config.dtype)
    return report["metric"]["value"]


def _binding(backbone, bench):
    return binding_for(backbone, bench.dataset("train"))


def _match_from_file(matched: dict[tuple, float], out: Path, run: RunSpec, base_key: str) -> None:
    """Fill `matched` for `run` (a baseline) from a SmartTrim result in `out` on the same base model
    when this bench has not run that SmartTrim point itself (e.g. another ``--methods`` selection):
    the seed's own point, else seed 0's."""
    for seed in dict.fromkeys((run.seed, 0)):
        key = (run.family, run.task, run.ratio, seed)
        if key in matched:
            return
        data = _read_result(out / f"{RunSpec(run.family, run.task, 'smarttrim', run.ratio, seed).name}.json")
        try:
            ratio = float(data["train"]["val_executed_ratio"])
        except (ValueError, KeyError, TypeError):  # missing (None), unfinished or another format
            continue
        if data.get("base", {}).get("key") == base_key:
            matched[key] = ratio
            return


def run_one(config: BenchConfig, run: RunSpec, bench, matched: dict[tuple, float]) -> dict:
    """Execute `run` on a copy of `bench`'s model; the run's result (without environment fields).

    matched: ``(family, task, ratio, seed) -> executed ratio`` of the SmartTrim runs, filled here by
    SmartTrim runs and read by baselines.
    """
    start = time.perf_counter()
    backbone = fresh_copy(bench, config.device)
    result: dict[str, Any] = {"train": None}
    if run.method == "full":
        report = _evaluate(backbone, bench, config, latency=False)
        report["latency_ratio"] = {"batch_1": 1.0, f"batch_{config.latency_batch}": 1.0}
    elif run.trained:
        trained = train(backbone, bench.data["train"], target_ratio=run.ratio, steps=config.steps,
                        recipe=smarttrim_configs(run.method, run.ratio), config=train_config(config, run),
                        progress=False)
        backbone = trained.backbone
        with autocast(resolve_device(config.device), resolve_dtype(config.dtype)):
            match = executed_ratio(backbone.model, (model_batch(trained.binding, collate([item]), config.device)[0]
                                                    for item in items_of(bench, "val", config.match_items)))
        if run.method == "smarttrim":
            matched[(run.family, run.task, run.ratio, run.seed)] = match
        result["train"] = {"steps": config.steps, "threshold": trained.threshold,
                           "calibrated_ratio": trained.calibrated_ratio, "expected_ratio": trained.expected_ratio,
                           "val_executed_ratio": match, "last": trained.history[-1] if trained.history else None}
        report = _evaluate(backbone, bench, config)
    else:
        key = (run.family, run.task, run.ratio, run.seed)
        target = matched.get(key, matched.get((run.family, run.task, run.ratio, 0), run.ratio))
        applied = apply_(backbone.model, [baseline_config(run.baseline, target, run.seed)],
                         inputs=backbone.example_inputs(2), hints=backbone.hints)
        result["apply"] = {"flops_ratio_target": target,
                           "report": {k: v for k, v in applied.results[-1].report.items()
                                      if k in ("keep_ratio", "flops_ratio", "trimmed_streams", "notes")}}
        if run.method.endswith("+ft"):
            binding = _binding(backbone, bench)
            losses = finetune(backbone.model, binding, bench.dataset("train"), steps=config.steps,
                              batch_size=config.batch_size, lr=config.lr_backbone, alpha=config.alpha,
                              seed=run.seed, device=config.device, dtype=config.dtype)
            result["train"] = {"steps": config.steps, "loss_first": losses[0], "loss_last": losses[-1]}
        report = _evaluate(backbone, bench, config)
    result.update(_summary(report, config))
    result["val_accuracy"] = _val_accuracy(backbone, bench, config)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _summary(report: dict, config: BenchConfig) -> dict:
    lat = {k: v for k, v in report["latency_ratio"].items()}
    speedup = {k: (1.0 / v if v else None) for k, v in lat.items()}
    return {"accuracy": report["metric"]["value"], "metric": report["metric"]["name"],
            "accuracy_untrimmed": report["metric_untrimmed"]["value"], "items": report["items"],
            "flops": report["flops"], "flops_untrimmed": report["flops_untrimmed"],
            "flops_ratio": report["flops_ratio"], "flops_reduction": 1.0 / report["flops_ratio"],
            "latency_ratio": lat, "latency_speedup": speedup, "latency_ms": report.get("latency_ms", {}),
            "latency_batches": [1, config.latency_batch], "data": report["data"]}


# ----------------------------------------------------------------------------------------------
# The bench
# ----------------------------------------------------------------------------------------------
def run_bench(config: BenchConfig, out_dir: str | os.PathLike, *, command: str | None = None,
              log: Callable[[str], None] = print, progress: bool = False,
              only: Iterable[str] | None = None) -> list[Path]:
    """Run every planned run not already done; the JSON paths written or kept, in plan order.

    command: the exact command line recorded in each JSON (default: ``sys.argv``); only: run names
    (`RunSpec.name`) to restrict to.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = command or " ".join(["trimkit", *sys.argv[1:]] if Path(sys.argv[0]).name == "trimkit" else sys.argv)
    env = environment(config)
    wanted = set(only) if only is not None else None
    old_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    paths: list[Path] = []
    matched: dict[tuple, float] = {}
    try:
        for family in config.families:
            for task in config.tasks:
                t0 = time.perf_counter()
                bench = base_model(config, family, task, progress=progress)
                log(f"base {family}/{task}: {'loaded' if bench.loaded else 'trained'} "
                    f"({time.perf_counter() - t0:.0f} s), val {bench.metrics.get('val', {})}")
                base_key = bench.record.get("key", "unknown")
                for run in plan(replace(config, families=(family,), tasks=(task,))):
                    if wanted is not None and run.name not in wanted:
                        continue
                    path = out / f"{run.name}.json"
                    digest = config_hash(config, run, base_key)
                    done = _existing(path, digest)
                    if done is not None:
                        if run.method == "smarttrim" and done.get("train"):
                            matched[(family, task, run.ratio, run.seed)] = done["train"]["val_executed_ratio"]
                        log(f"skip {run.name} (done)")
                        paths.append(path)
                        continue
                    if not run.trained and run.method != "full":
                        _match_from_file(matched, out, run, base_key)
                    torch.manual_seed(run.seed)
                    result = run_one(config, run, bench, matched)
                    record = {"format": FORMAT, "name": run.name, "config_hash": digest, **dataclasses.asdict(run),
                              **result, "base": {"key": base_key, "path": str(bench.path), "metrics": bench.metrics,
                                                 "steps": bench.train.steps, "model": bench.config.to_dict()},
                              "bench": config.to_dict(), "seeds": {"run": run.seed, "base": bench.seed},
                              "environment": env, "command": command,
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                    _write_json(path, record)
                    paths.append(path)
                    log(_line(record))
    finally:
        torch.set_num_threads(old_threads)
    return paths


def _line(record: dict) -> str:
    lat = record["latency_speedup"]
    b1, bn = lat.get("batch_1"), lat.get(f"batch_{record['latency_batches'][1]}")
    fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    return (f"{record['name']:<48} acc {record['accuracy']:.4f}  GFLOPs {record['flops']['mean'] / 1e9:.4f} "
            f"(x{record['flops_reduction']:.2f} fewer)  speedup b1 {fmt(b1)} b{record['latency_batches'][1]} "
            f"{fmt(bn)}  [{record['seconds']:.0f} s]")
