"""Saved folders (``trimkit apply --out DIR``): safetensors weights and JSON, no pickles.

Layout::

    DIR/trimkit.json        {"format": 1, "base": {"ref", "kind", ...}, "recipe": [config dicts],
                             "map": ModelMap dict, "versions": {...}, "extra": {...}}
    DIR/base/               the untouched base model: ``save_pretrained`` output for Hugging Face
                            models, ``model.safetensors`` (its state dict) for factory models
    DIR/model.safetensors   the full state dict after the passes (trimmer weights, int8 buffers, ...)

`load_folder` rebuilds the base (Hugging Face: from ``DIR/base``; factories: re-runs the factory and
loads ``DIR/base/model.safetensors``), re-applies the recipe with the saved map (handlers see
``context.restoring = True``), then loads ``DIR/model.safetensors`` strictly, so the restored model
gives the same outputs. `save_folder` writes into a temporary sibling folder and renames it into
place, so a failure never leaves a half-written folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from trimkit.errors import ConfigError, TrimkitError
from trimkit.runtime import state

__all__ = ["FORMAT", "MANIFEST", "save_folder", "load_folder", "read_manifest", "is_trimkit_folder",
           "hf_base_writer", "state_dict_base_writer"]

FORMAT = 1
MANIFEST = "trimkit.json"
WEIGHTS = "model.safetensors"
BASE_DIR = "base"

BaseWriter = Callable[[Path], None]


def is_trimkit_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding a ``trimkit.json``."""
    return (Path(path) / MANIFEST).is_file()


@contextlib.contextmanager
def _quiet_transformers():
    """No transformers progress bars while writing or reading a folder (restored afterwards)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def hf_base_writer(model: nn.Module) -> BaseWriter:
    """A writer saving a Hugging Face model (before any pass) with ``save_pretrained`` (safetensors)."""
    return lambda where: model.save_pretrained(str(where))


def state_dict_base_writer(model: nn.Module) -> BaseWriter:
    """A writer saving a plain model's state dict (before any pass) to ``model.safetensors``."""
    return lambda where: save_model(model, str(where / WEIGHTS))


def _resolved_factory_ref(ref: str) -> str | None:
    """``/abs/path/file.py:factory`` for a file factory reference given relative to the working folder."""
    from trimkit.backbones.factory import is_factory_ref

    if not is_factory_ref(ref):
        return None
    target, _, attr = ref.rpartition(":")
    path = Path(target).expanduser()
    if target.endswith(".py") and path.is_file():
        return f"{path.resolve()}:{attr}"
    return None


def _versions() -> dict[str, str]:
    import safetensors

    import trimkit

    versions = {"trimkit": trimkit.__version__, "torch": torch.__version__, "safetensors": safetensors.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    return versions


def _write_base(where: Path, base_ref: str, writer: BaseWriter | None) -> str:
    """Write the base model into `where`; its kind (``"hf"`` or ``"factory"``)."""
    where.mkdir()
    if writer is None:
        from trimkit.backbones import load_backbone

        with _quiet_transformers():
            base = load_backbone(base_ref).model
        writer = hf_base_writer(base) if _is_hf(base) else state_dict_base_writer(base)
    with _quiet_transformers():
        writer(where)
    if (where / "config.json").is_file():
        return "hf"
    if (where / WEIGHTS).is_file():
        return "factory"
    raise TrimkitError(f"the base writer wrote neither config.json nor {WEIGHTS} into {str(where)!r}")


def _no_pickles(root: Path) -> None:
    bad = [str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    if bad:
        raise TrimkitError(f"refusing to save pickled files: {', '.join(sorted(bad))}")


def _prepare_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"output {str(out)!r} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not is_trimkit_folder(out):
        raise ConfigError(f"output folder {str(out)!r} is not empty and is not a trimkit folder; choose another")
    if not overwrite:
        raise ConfigError(f"output folder {str(out)!r} already holds a saved model; pass overwrite to replace it")


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


def save_folder(out_dir: str | os.PathLike, *, base_ref: str, model: nn.Module,
                base_model_dir_writer: BaseWriter | None = None, recipe_configs: Sequence | None = None,
                model_map: Any = None, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write `model` (after its passes) as a folder `load_folder` restores exactly; the folder path.

    base_ref: the model reference the base was loaded from (written to the manifest).
    base_model_dir_writer: writes the untouched base into the folder it is given; None re-loads
      `base_ref` and writes it (``save_pretrained`` for Hugging Face models, else its state dict).
    recipe_configs / model_map: default to the passes and map recorded on `model` by ``apply_``.
    extra: JSON-serialisable facts kept under ``"extra"``.
    overwrite: replace an existing trimkit folder (other non-empty folders are never replaced).
    """
    from trimkit.passes.registry import config_to_dict

    out = Path(out_dir).expanduser()
    configs = list(recipe_configs) if recipe_configs is not None else [r.config for r in state.get(model, state.APPLIED, [])]
    model_map = model_map if model_map is not None else state.get(model, state.MAP)
    if model_map is None:
        raise ConfigError("save_folder needs the model map (give model_map=, or apply passes with apply_ first)")
    manifest = {
        "format": FORMAT,
        "base": {"ref": base_ref, "resolved_ref": _resolved_factory_ref(base_ref), "class": type(model).__name__},
        "recipe": [config_to_dict(c) for c in configs],
        "map": model_map.to_dict(),
        "versions": _versions(),
        "extra": dict(extra or {}),
    }
    try:
        json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"save_folder: the manifest is not plain JSON ({err}); check `extra`") from None
    _prepare_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest["base"]["kind"] = _write_base(tmp / BASE_DIR, base_ref, base_model_dir_writer)
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "trimkit_format": str(FORMAT)})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        _no_pickles(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(path: str | os.PathLike) -> dict:
    """The parsed ``trimkit.json`` of a saved folder (checked format)."""
    file = Path(path).expanduser() / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{str(Path(path))!r} is not a trimkit folder (no {MANIFEST})") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {str(file)!r}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ConfigError(f"{str(file)!r} has format {found!r}; this trimkit reads format {FORMAT}")
    missing = [k for k in ("base", "recipe", "map") if k not in manifest]
    if missing:
        raise ConfigError(f"{str(file)!r} lacks {', '.join(missing)}")
    return manifest


def _factory_ref(base: dict) -> str:
    ref, resolved = base["ref"], base.get("resolved_ref")
    if resolved and _resolved_factory_ref(ref) is None:
        return resolved  # the relative path no longer resolves from here
    return ref


def _load_base(folder: Path, base: dict):
    from trimkit.backbones import load_backbone

    kind = base.get("kind")
    if kind == "hf":
        with _quiet_transformers():
            backbone = load_backbone(str(folder / BASE_DIR))
    elif kind == "factory":
        backbone = load_backbone(_factory_ref(base))
        _load_weights(backbone.model, folder / BASE_DIR / WEIGHTS, "base weights")
    else:
        raise ConfigError(f"{str(folder / MANIFEST)!r}: unknown base kind {kind!r} (expected 'hf' or 'factory')")
    return backbone


def _load_weights(model: nn.Module, file: Path, what: str) -> None:
    if not file.is_file():
        raise ConfigError(f"saved folder lacks {str(file)!r}")
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except RuntimeError as err:  # shape mismatches
        text = " ".join(str(err).split())
        raise TrimkitError(f"{what} in {str(file)!r} do not fit the rebuilt model: {_clip(text)}") from None
    if missing or unexpected:
        raise TrimkitError(f"{what} in {str(file)!r} do not fit the rebuilt model: "
                           f"{_some('missing', missing)}; {_some('unexpected', unexpected)}")


def _some(label: str, keys, shown: int = 3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} {label} ({', '.join(keys[:shown])}{more})" if keys else f"0 {label}"


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_folder(path: str | os.PathLike):
    """Rebuild a saved folder as a `Backbone` (source ``"trimkit"``) whose model gives the saved outputs."""
    from trimkit.locate import ModelMap
    from trimkit.passes.manager import apply_
    from trimkit.passes.registry import config_from_dict

    folder = Path(path).expanduser()
    manifest = read_manifest(folder)
    configs = [config_from_dict(d) for d in manifest["recipe"]]
    model_map = ModelMap.from_dict(manifest["map"])
    backbone = _load_base(folder, manifest["base"])
    model = backbone.model
    with torch.random.fork_rng(devices=[]):
        report = apply_(model, configs, model_map=model_map, inputs=backbone.example_inputs(2),
                        hints=backbone.hints, restoring=True)
    model = report.model
    _load_weights(model, folder / WEIGHTS, "weights")
    model.eval()
    return dataclasses.replace(backbone, name=str(path), model=model, source="trimkit")
