"""What SmartTrim training records besides the loss: the final hidden states of each stream, the
tokens the trimmers kept, a progress bar, and the output folder the trained model is written to."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from transformers import PreTrainedModel

from trimkit.runtime import runtimes, state
from trimkit.io import hf_base_writer, save_folder
from trimkit.progress import progress

__all__ = ["HiddenStates", "survivor_masks", "ProgressBar", "step_info", "write_folder"]


class HiddenStates:
    """Records the first tensor output of each stream's last layer (for the hidden-state MSE)."""

    def __init__(self, model: nn.Module):
        model_map = state.get(model, state.MAP)
        self.paths = [s.layers[-1].path for s in getattr(model_map, "streams", []) if s.layers]
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(p).register_forward_hook(self._make(p)) for p in self.paths]

    def _make(self, path: str):
        def hook(module, args, output):
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


def survivor_masks(model: nn.Module) -> dict:
    masks = {}
    for rt in runtimes(model):
        if hasattr(rt, "cost_inputs"):
            for path, value in rt.cost_inputs().get("tokens", {}).items():
                if isinstance(value, torch.Tensor) and value.dim() == 2:
                    masks[path] = value.detach()
    return masks


def step_info(row: dict, executed: float | None) -> str:
    """The progress text of one training step: its losses, the expected and target ratios, and the
    last executed ratio measured."""
    return (f"loss {row['loss']:.3f} (task {row['task']:.3f} distill {row['distill']:.3f} "
            f"cost {row['cost']:.4f})  ratio {row['ratio']:.3f} -> {row['target']:.3f}  "
            f"executed {'-' if executed is None else f'{executed:.3f}'}")


class ProgressBar:
    """The training steps' progress (see :mod:`trimkit.progress`) with the last row's losses, the
    items per second (`items` per step) and the executed-FLOPs ratio last measured."""

    def __init__(self, enabled: bool, steps: int, start: int, items: int = 0):
        self.block, self.steps, self.start, self.items = progress(enabled), steps, start, items
        self.bar, self.task = None, 0
        self.clock: float | None = None

    def __enter__(self):
        self.bar = self.block.__enter__()
        self.task = self.bar.add("step", self.steps, self.start)
        self.clock = time.perf_counter()
        return self

    def __exit__(self, *exc):
        return self.block.__exit__(*exc)

    def update(self, row: dict, executed: float | None) -> None:
        now = time.perf_counter()
        rate = self.items / (now - self.clock) if self.clock is not None and now > self.clock and self.items else None
        self.clock = now
        if self.bar.active:
            info = step_info(row, executed) + (f"  {rate:.1f} items/s" if rate is not None else "")
            if "peak_mib" in row:
                info += f"  peak {row['peak_mib']:.0f} MiB"
            self.bar.advance(self.task, info=info)


def _base_writer(model: nn.Module):
    """A writer of the backbone without its passes: a fresh instance of the (adapted) Hugging Face
    class with the trained weights copied where names and shapes agree; None for other models
    (``save_folder`` then re-loads the reference)."""
    if not isinstance(model, PreTrainedModel):
        return None

    def write(where: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            fresh = type(model)(model.config)
        own = model.state_dict()
        fitting = {k: v for k, v in fresh.state_dict().items() if k in own and own[k].shape == v.shape}
        fresh.load_state_dict({k: own[k] for k in fitting}, strict=False)
        hf_base_writer(fresh)(where)

    return write


def write_folder(out_dir: Path, backbone, base_ref: str, extra: dict, configs: list | None = None) -> None:
    """Write the trimkit folder into `out_dir`, next to its ``checkpoints`` folder."""
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
