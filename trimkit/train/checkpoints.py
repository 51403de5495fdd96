"""Checkpoints: ``OUT/checkpoints/step-NNNNNN/`` holds the model and optimizer tensors as safetensors
and the step, configuration, history and random states as JSON, no pickles. Resuming from one
continues exactly: the data order is a function of (seed, step) and the random state is restored.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from trimkit.errors import ConfigError

__all__ = ["CHECKPOINTS", "STATE_FORMAT", "rng_state", "set_rng_state", "latest_checkpoint", "save_checkpoint",
           "load_checkpoint"]

CHECKPOINTS = "checkpoints"
STATE_FORMAT = 1


def rng_state() -> dict:
    """The random states of torch (and CUDA), Python and numpy."""
    state = {"torch": torch.get_rng_state().clone(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
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


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, rng: dict,
                     meta: dict, keep: int) -> Path:
    """Write ``OUT/checkpoints/step-NNNNNN`` atomically (a temporary folder renamed into place) and
    delete the oldest ones beyond `keep`."""
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


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Load a checkpoint's tensors into `model` and `opt`; its state, random states under ``rng_state``."""
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
