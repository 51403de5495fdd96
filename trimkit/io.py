"""Writing saved folders (``trimkit apply --out DIR``) and guarding output folders.

The layout, reading and rebuilding live in :mod:`trimkit.backbones.saved` (``load_folder`` here
rebuilds through `trimkit.backbones.load_saved`). `save_folder` writes into a temporary sibling
folder and renames it into place, so a failure never leaves a half-written folder.

Commands that write a folder call `prepare_out_dir` before any work (one-line errors naming the
path the user typed) and write through `staged_out_dir`, which replaces an old folder only once
the new result is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import safetensors
import torch
from safetensors.torch import save_file, save_model
from torch import nn
from transformers import PreTrainedModel

import trimkit
from trimkit.backbones import Backbone, load_backbone, load_saved
from trimkit.backbones.saved import (BASE_DIR, FORMAT, INPUTS, MANIFEST, WEIGHTS, check_folder, is_trimkit_folder,
                                     quiet_transformers, read_manifest, resolved_factory_ref, safetensors_problem)
from trimkit.errors import ConfigError, TrimkitError
from trimkit.passes.registry import config_to_dict
from trimkit.runtime import state

__all__ = ["FORMAT", "MANIFEST", "save_folder", "load_folder", "read_manifest", "is_trimkit_folder", "check_folder",
           "safetensors_problem", "hf_base_writer", "state_dict_base_writer", "base_writer",
           "stores_example_inputs", "prepare_out_dir", "staged_out_dir"]

CHECKPOINTS = "checkpoints"
BaseWriter = Callable[[Path], None]


def is_hf(model: nn.Module) -> bool:
    """Whether `model` is a Hugging Face ``PreTrainedModel`` (saved with ``save_pretrained``)."""
    return isinstance(model, PreTrainedModel)


def hf_base_writer(model: nn.Module) -> BaseWriter:
    """A writer saving a Hugging Face model (before any pass) with ``save_pretrained`` (safetensors)."""
    return lambda where: model.save_pretrained(str(where))


def state_dict_base_writer(model: nn.Module) -> BaseWriter:
    """A writer saving a plain model's state dict (before any pass) to ``model.safetensors``."""
    return lambda where: save_model(model, str(where / WEIGHTS))


def base_writer(model: nn.Module) -> BaseWriter:
    """The writer of an untouched base model: ``save_pretrained`` for Hugging Face models, else its state dict."""
    return hf_base_writer(model) if is_hf(model) else state_dict_base_writer(model)


def stores_example_inputs(backbone: Backbone) -> bool:
    """Whether a saved folder of `backbone` keeps its example inputs: factory models, whose inputs
    (region features, embeddings, ...) no registry family can make again."""
    return backbone.source == "factory"


def _versions() -> dict[str, str]:
    import transformers

    return {"trimkit": trimkit.__version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
            "transformers": transformers.__version__}


def _write_base(where: Path, base_ref: str, writer: BaseWriter | None) -> str:
    """Write the base model into `where`; its kind (``"hf"`` or ``"factory"``)."""
    where.mkdir()
    with quiet_transformers():
        writer = writer or base_writer(load_backbone(base_ref).model)
        writer(where)
    if (where / "config.json").is_file():
        return "hf"
    if (where / WEIGHTS).is_file():
        return "factory"
    raise TrimkitError(f"the base writer wrote neither config.json nor {WEIGHTS} into {str(where)!r}")


def _split_inputs(inputs: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, plain JSON values) of an example batch; anything else is a `ConfigError`."""
    tensors, values = {}, {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
        elif value is None or isinstance(value, (bool, int, float, str)):
            values[key] = value
        else:
            raise ConfigError(f"example input {key!r} is a {type(value).__name__}; a saved folder keeps "
                              "tensors and plain values only")
    return tensors, values


def _no_pickles(root: Path) -> None:
    bad = [str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    if bad:
        raise TrimkitError(f"refusing to save pickled files: {', '.join(sorted(bad))}")


def _has_checkpoints(folder: Path) -> bool:
    """Whether `folder` holds training checkpoints (``checkpoints/step-*``)."""
    return any((folder / CHECKPOINTS).glob("step-*"))


def _owned(folder: Path) -> bool:
    return is_trimkit_folder(folder) or _has_checkpoints(folder)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(where: Path, label: str, typed: str) -> None:
    """Create and remove a temporary folder in `where` (or the nearest folder above it that exists)."""
    home = _nearest_existing(where)
    if not home.is_dir():
        raise ConfigError(f"{label} {typed!r} cannot be written: {str(home)!r} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".trimkit-probe-", dir=home))
    except OSError as err:
        raise ConfigError(f"{label} {typed!r} cannot be written ({err.strerror or type(err).__name__})") from None


def prepare_out_dir(path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
                    label: str = "--out") -> Path:
    """Check an output folder before any work; its expanded path. Writes nothing.

    Refuses (one-line `ConfigError` naming `path` as given): a file; a non-empty folder trimkit did
    not write (even with `overwrite`); a trimkit folder (saved model or training checkpoints)
    unless `overwrite` (replace it) or `resume` (continue the training whose checkpoints it holds);
    `resume` without checkpoints; a place where nothing can be written.
    label: how the path is named in messages (``--out`` for the CLI, ``output folder`` for the API).
    """
    typed = os.fspath(path)
    out = Path(typed).expanduser()
    cli = label.startswith("--")
    flag, again = ("--overwrite", "--resume") if cli else ("overwrite=True", "resume=True")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{label} {typed!r} exists and is not a folder")
    filled = out.is_dir() and any(out.iterdir())
    if resume:
        if not (filled and _has_checkpoints(out)):
            raise ConfigError(f"nothing to resume: {label} {typed!r} holds no training checkpoints")
        _probe_writable(out, label, typed)
        return out
    if filled and not _owned(out):
        raise ConfigError(f"{label} {typed!r} is not empty and is not a trimkit folder; choose another "
                          "(nothing was written)")
    if filled and not overwrite:
        what = "a saved model" if is_trimkit_folder(out) else "training checkpoints"
        more = f" or {again} to continue it" if _has_checkpoints(out) else ""
        raise ConfigError(f"{label} {typed!r} already holds {what}; add {flag} to replace it{more} "
                          "(nothing was written)")
    _probe_writable(out.parent, label, typed)
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old / out.name, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def staged_out_dir(out: str | os.PathLike, *, keep_partial: bool = False) -> Iterator[Path]:
    """Write a result into a temporary sibling of `out`, then swap it into place.

    Yields the folder to write into. On success it replaces `out` (an old folder is removed only
    after the swap); on any failure (Ctrl-C included) it is deleted and `out` is left as it was.
    keep_partial: when `out` is absent or empty there is nothing to protect, so the folder yielded
    is `out` itself and what was written before a failure (e.g. training checkpoints) stays there.
    """
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    if keep_partial and (not out.exists() or (out.is_dir() and not any(out.iterdir()))):
        out.mkdir(exist_ok=True)
        yield out
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_folder(out_dir: str | os.PathLike, *, base_ref: str, model: nn.Module,
                base_model_dir_writer: BaseWriter | None = None, recipe_configs: Sequence | None = None,
                model_map: Any = None, extra: dict | None = None, overwrite: bool = False,
                example_inputs: Mapping[str, Any] | None = None) -> Path:
    """Write `model` (after its passes) as a folder `load_folder` restores exactly; the folder path.

    base_ref: the model reference the base was loaded from (written to the manifest).
    base_model_dir_writer: writes the untouched base into the folder it is given; None re-loads
      `base_ref` and writes it (``save_pretrained`` for Hugging Face models, else its state dict).
    recipe_configs / model_map: default to the passes and map recorded on `model` by ``apply_``.
    extra: JSON-serialisable facts kept under ``"extra"``.
    overwrite: replace an existing trimkit folder (other non-empty folders are never replaced).
    example_inputs: a batch kept as ``inputs.safetensors`` and fed to the passes when the folder
      is loaded (for models whose inputs cannot be made again; see `stores_example_inputs`).
    """
    out = Path(out_dir).expanduser()
    configs = list(recipe_configs) if recipe_configs is not None else [r.config for r in state.get(model, state.APPLIED, [])]
    model_map = model_map if model_map is not None else state.get(model, state.MAP)
    if model_map is None:
        raise ConfigError("save_folder needs the model map (give model_map=, or apply passes with apply_ first)")
    manifest = {
        "format": FORMAT,
        "base": {"ref": base_ref, "resolved_ref": resolved_factory_ref(base_ref), "class": type(model).__name__},
        "recipe": [config_to_dict(c) for c in configs],
        "map": model_map.to_dict(),
        "versions": _versions(),
        "extra": dict(extra or {}),
    }
    tensors, values = _split_inputs(example_inputs) if example_inputs is not None else ({}, {})
    if example_inputs is not None:
        manifest["inputs"] = {"order": list(example_inputs), "values": values}
    try:
        json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"save_folder: the manifest is not plain JSON ({err}); check `extra`") from None
    prepare_out_dir(out, overwrite=overwrite, label="output folder")
    with staged_out_dir(out) as tmp:
        manifest["base"]["kind"] = _write_base(tmp / BASE_DIR, base_ref, base_model_dir_writer)
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "trimkit_format": str(FORMAT)})
        if example_inputs is not None:
            save_file(tensors, str(tmp / INPUTS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        _no_pickles(tmp)
    return out


def load_folder(path: str | os.PathLike) -> Backbone:
    """Rebuild a saved folder as a `Backbone` (source ``"trimkit"``) whose model gives the saved outputs."""
    return load_saved(path)
