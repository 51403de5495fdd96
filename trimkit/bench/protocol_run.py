"""Execute a :mod:`trimkit.bench.protocol`: one JSON per run, failed runs kept, a manifest.

Each run loads its model fresh from the registry, trains or applies what its method needs, and
scores every validation and test item with :func:`trimkit.bench.sweep.sweep` (correctness trimmed
and untrimmed, executed FLOPs of every item). Results go to ``OUT/<run name>.json`` as soon as a
run ends; a run that raises is written too, with ``"status": "failed"`` and the error, and is
retried by the next invocation. ``OUT/MANIFEST.json`` lists every file with its status, protocol
digest and git revision.

Several processes may share one results folder: a run is claimed with ``<name>.lock`` (created
exclusively, holding the process id; a lock whose process is gone is taken over), so starting the
same command twice runs two runs at a time.
"""
from __future__ import annotations

import json
import os
import platform
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from trimkit.bench.protocol import CONTROL, PRIOR, Protocol, ProtocolRun, plan
from trimkit.errors import ConfigError

__all__ = ["run_protocol", "execute", "train_smarttrim", "read_run", "FORMAT", "MANIFEST"]

FORMAT = 1
MANIFEST = "MANIFEST.json"


def read_run(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _done(path: Path, protocol: Protocol) -> bool:
    data = read_run(path)
    return bool(data) and data.get("status") == "ok" and data.get("protocol", {}).get("digest") == protocol.digest


def _claim(lock: Path) -> bool:
    """Create `lock` exclusively; take over a lock whose process no longer runs."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
                return False
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)
                continue
            except PermissionError:
                return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


# ----------------------------------------------------------------------------- one run
def _fit(protocol: Protocol, model: str):
    """A fresh copy of `model` fitted to the protocol's data, its binding and the split items."""
    from trimkit.backbones import load_backbone
    from trimkit.evaluate import fitted

    backbone, binding, _ = fitted(load_backbone(model), protocol.spec("val"), "val")
    return backbone, binding, _split_items(protocol, binding)


def _split_items(protocol: Protocol, binding) -> dict[str, list[dict]]:
    """Every validation and test item, as `binding`'s model reads them."""
    from trimkit.tasks import task_dataset

    out = {}
    for split in ("val", "test"):
        dataset = task_dataset(protocol.spec(split), binding)
        out[split] = [dataset[i] for i in range(len(dataset))]
    return out


def _sweeps(protocol: Protocol, model, binding, items: dict, progress: bool, cache: Path | None = None) -> dict:
    """Both splits swept; `cache` keeps the FLOPs of signatures already counted (SmartTrim runs of
    one model share it: same architecture, same passes)."""
    from trimkit.bench.sweep import sweep

    known = (read_run(cache) or {}) if cache is not None else {}
    out = {split: sweep(model, binding, items[split], batch_size=protocol.eval_batch, verify=protocol.verify,
                        seed=protocol.splits[split][1], progress=progress, known=known).summary()
           for split in ("val", "test")}
    if cache is not None:
        merged = read_run(cache) or {}
        for side, table in known.items():
            merged.setdefault(side, {}).update(table)
        _write(cache, merged)
    return out


def _prior(protocol: Protocol, run: ProtocolRun) -> dict:
    from trimkit.bench.sweep import pack_bits
    from trimkit.bench.where import prior_correct
    from trimkit.data import load_dataset

    train = load_dataset(protocol.spec("train", n=max(protocol.splits["train"][0], protocol.prior_items)))
    out = {}
    for split in ("val", "test"):
        correct, _ = prior_correct(train, load_dataset(protocol.spec(split)), protocol.prior_items)
        out[split] = {"items": len(correct), "accuracy": float(np.mean(correct)), "correct": pack_bits(correct)}
    return out


def _matched_ratio(out: Path, run: ProtocolRun) -> float:
    source = out / f"{run.matched.name}.json"
    data = read_run(source)
    if not data or data.get("status") != "ok":
        raise ConfigError(f"{run.name} is matched to {source.name}, which has not finished")
    return float(data["val"]["flops_ratio"])


def _finetune(protocol: Protocol, model, binding, seed: int, alpha: float, lr: float) -> dict:
    from trimkit.bench.run import finetune
    from trimkit.tasks import task_dataset

    train_cfg = _train_config(protocol, seed)
    losses = finetune(model, binding, task_dataset(protocol.spec("train"), binding), steps=protocol.steps,
                      batch_size=train_cfg.batch_size, lr=lr, alpha=alpha, seed=seed, device="cpu")
    return {"steps": protocol.steps, "batch_size": train_cfg.batch_size, "lr": lr, "alpha": alpha,
            "loss_first": losses[0], "loss_last": losses[-1]}


def _train_config(protocol: Protocol, seed: int):
    from trimkit.train import TrainConfig

    return TrainConfig(**protocol.train, seed=seed)


def train_smarttrim(protocol: Protocol, run: ProtocolRun, progress: bool,
                    recipe: list | None = None) -> tuple[Any, Any, dict]:
    """SmartTrim trained on the protocol's training split at `run`'s ratio and seed: the backbone, its
    binding and what training reported. `recipe` replaces the pass configs (screens only; the
    protocol's runs use SmartTrim's default tokens + heads)."""
    from trimkit.backbones import load_backbone
    from trimkit.bench.run import smarttrim_configs
    from trimkit.train import train

    trained = train(load_backbone(run.model), protocol.spec("train"), target_ratio=run.ratio, steps=protocol.steps,
                    recipe=recipe or smarttrim_configs("smarttrim", run.ratio), config=_train_config(protocol, run.seed),
                    progress=progress)
    info = {"steps": protocol.steps, "threshold": trained.threshold, "calibrated_ratio": trained.calibrated_ratio,
            "expected_ratio": trained.expected_ratio, "last": trained.history[-1] if trained.history else None}
    return trained.backbone, trained.binding, info


def execute(protocol: Protocol, run: ProtocolRun, out: Path, progress: bool = False) -> dict:
    """The result fields of one run (raises on failure)."""
    from trimkit.bench.run import baseline_config
    from trimkit.passes import apply_

    torch.manual_seed(run.seed)
    if run.method == PRIOR:
        return _prior(protocol, run)
    result: dict[str, Any] = {}
    if run.method == "smarttrim":
        backbone, binding, result["train"] = train_smarttrim(protocol, run, progress)
        items = _split_items(protocol, binding)
    else:
        backbone, binding, items = _fit(protocol, run.model)
        if run.baseline:
            target = _matched_ratio(out, run)
            applied = apply_(backbone.model, [baseline_config(run.baseline, target, run.seed)],
                             inputs=backbone.example_inputs(2), hints=backbone.hints)
            result["apply"] = {"flops_ratio_target": target,
                               "report": {k: v for k, v in applied.results[-1].report.items()
                                          if k in ("keep_ratio", "flops_ratio", "notes")}}
        if run.method == CONTROL or run.finetuned:
            control = run.method == CONTROL
            alpha = 0.0 if control else float(protocol.train.get("alpha", 1.0))
            lr = _train_config(protocol, run.seed).lr_backbone if control else protocol.finetune_lr
            result["train"] = _finetune(protocol, backbone.model, binding, run.seed, alpha, lr)
    cache = out / f"flops-cache-{run.model}-smarttrim.json" if run.method == "smarttrim" else None
    result.update(_sweeps(protocol, backbone.model.eval(), binding, items, progress, cache))
    return result


# ----------------------------------------------------------------------------- the loop
def _environment() -> dict:
    import transformers

    from trimkit.bench.run import git_revision

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "platform": platform.platform(), "git_revision": git_revision()}


def _manifest(out: Path, protocol: Protocol) -> None:
    rows = []
    for path in sorted(out.glob("*.json")):
        data = read_run(path)
        if not data or "method" not in data:
            continue
        rows.append({"file": path.name, "status": data.get("status"), "protocol": data.get("protocol", {}).get("digest"),
                     "current": data.get("protocol", {}).get("digest") == protocol.digest,
                     "git_revision": data.get("environment", {}).get("git_revision"),
                     "seconds": data.get("seconds"), "finished": data.get("finished"), "error": data.get("error")})
    _write(out / MANIFEST, {"protocol": protocol.to_dict(), "runs": rows})


def _record(protocol: Protocol, run: ProtocolRun, command: str, env: dict) -> dict:
    return {"format": FORMAT, "name": run.name, "model": run.model, "method": run.method, "ratio": run.ratio,
            "seed": run.seed, "protocol": protocol.to_dict(), "command": command, "environment": env}


def run_protocol(protocol: Protocol, out_dir: str | os.PathLike, *, command: str = "", threads: int = 1,
                 log: Callable[[str], None] = print, progress: bool = False, only: set[str] | None = None) -> list[Path]:
    """Run every planned run of `protocol` not finished under this protocol version; return the
    JSON paths that exist for the plan. A baseline waits for the SmartTrim run it is matched to."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    env = _environment()
    runs = [r for r in plan(protocol) if only is None or r.name in only]
    try:
        pending = [r for r in runs if not _done(out / f"{r.name}.json", protocol)]
        while pending:
            progressed = False
            for run in list(pending):
                path, lock = out / f"{run.name}.json", out / f"{run.name}.lock"
                if _done(path, protocol):
                    pending.remove(run)
                    continue
                if run.baseline and not _done(out / f"{run.matched.name}.json", protocol):
                    continue
                if not _claim(lock):
                    continue
                try:
                    _one(protocol, run, path, out, command, env, log, progress)
                finally:
                    lock.unlink(missing_ok=True)
                    _manifest(out, protocol)
                pending.remove(run)
                progressed = True
            if pending and not progressed:
                if not any((out / f"{r.name}.lock").exists() for r in pending):
                    names = ", ".join(r.name for r in pending[:4])
                    log(f"cannot run {len(pending)} run(s) ({names}...): the SmartTrim runs they match did not finish")
                    break
                time.sleep(10)  # another process holds the runs left
    finally:
        torch.set_num_threads(old)
    return [out / f"{r.name}.json" for r in runs if (out / f"{r.name}.json").exists()]


def _one(protocol, run, path, out, command, env, log, progress) -> None:
    start = time.perf_counter()
    record = _record(protocol, run, command, env)
    try:
        record.update(execute(protocol, run, out, progress))
        record["status"] = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # kept as a failed run, retried next time
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=-10).splitlines()[-24:])
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    failed = out / f"{run.name}.failed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    _write(failed if record["status"] != "ok" else path, record)
    log(_line(record))


def _line(record: dict) -> str:
    if record["status"] != "ok":
        return f"{record['name']:<44} FAILED ({record['seconds']:.0f} s): {record['error']}"
    test = record["test"]
    flops = f"  x{test['flops_reduction']:.2f} fewer FLOPs (p95 x{test['flops_untrimmed']['mean'] / test['flops']['p95']:.2f})" \
        if "flops" in test else ""
    return (f"{record['name']:<44} val {record['val']['accuracy']:.4f}  test {test['accuracy']:.4f}{flops}  "
            f"[{record['seconds']:.0f} s]")
