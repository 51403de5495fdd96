"""Trained models shipped with trimkit: registry names for ``save_pretrained`` folders in the package.

Each name is a folder under ``trimkit/backbones/trained/`` holding ``model.safetensors`` and
``trained.json``: the data spec the model was trained on (``data``), the tokenizer's vocabulary
and answer classes it expects, the SHA-256 of the weights (checked on every load), the model's
config (``model``), its validation and test accuracy next to the blind prior, and the command that
reproduces it (``record.json`` keeps the training log). Two formats:

* a Hugging Face model: the folder also holds ``config.json`` and loads with ``from_pretrained``;
* ``"format": "bench"`` in ``trained.json``: a bench model (:mod:`trimkit.bench.models`, not one
  Hugging Face class), rebuilt with ``build_model`` from the recorded ``ModelConfig`` and given
  the weights (:func:`bench_trained_backbone`); its example inputs are validation items of its data.

``vilt-vqa-where``
    A ViLT (width 128, 4 layers, 8-pixel patches on 48-pixel images) trained on
    ``synthetic:vqa?image=48&objects=2-3&grid=3&jitter=0&questions=where``: questions that name
    one object among the others ("what shape is the red object ?", "what colour is the circle ?",
    "is there a blue triangle ?"); 0.999 on 1000 validation questions, where the question alone
    gives 0.300 (``trimkit/bench/README.md``).

``blip-vqa-where``
    A bench BLIP (``BlipVisionModel`` + ``BlipTextModel`` cross-attending to it + MLP head; width
    128, 4 layers per stream, same images) trained on the same data: 0.977 on 1000 validation
    questions (shape 1.000, colour 1.000, exists 0.898), 0.983 on test; bench format, float16.
``bridgetower-vqa-where``
    A bench BridgeTower (``BridgeTowerModel`` + MLP head; width 128, 4-layer towers, 2 co-attention
    layers) on the same data, shipped at its documented ceiling: 0.844 on validation, 0.864 on
    test; it reads every object's attributes but finds the named object less often (``exists``
    questions stay at the blind prior; ``trimkit/bench/README.md``).
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from trimkit.errors import ConfigError

__all__ = ["TRAINED_DIR", "INFO_FILE", "BENCH_FORMAT", "list_trained", "trained_folder", "trained_info",
           "weights_sha256", "bench_trained_backbone"]

TRAINED_DIR = Path(__file__).resolve().parent / "trained"
INFO_FILE = "trained.json"
WEIGHTS_FILE = "model.safetensors"
BENCH_FORMAT = "bench"


def list_trained() -> list[str]:
    """The names of the shipped trained models (folders holding :data:`INFO_FILE`)."""
    if not TRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in TRAINED_DIR.iterdir() if (p / INFO_FILE).is_file())


def weights_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=None)
def trained_info(name: str) -> dict:
    """The :data:`INFO_FILE` record of a shipped model (`ConfigError` when there is none)."""
    path = TRAINED_DIR / name / INFO_FILE
    if name not in list_trained():
        raise ConfigError(f"no shipped trained model {name!r}; shipped: {', '.join(list_trained()) or 'none'}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON ({err.msg})") from None


def trained_folder(name: str) -> Path:
    """The folder of shipped model `name`, after checking its weights against the recorded SHA-256."""
    info = trained_info(name)
    folder = TRAINED_DIR / name
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"shipped model {name!r} has no {WEIGHTS_FILE} in {folder} (a broken install?)")
    expected = info.get("sha256", {}).get(WEIGHTS_FILE)
    actual = weights_sha256(weights)
    if expected != actual:
        raise ConfigError(f"shipped model {name!r}: {weights} has SHA-256 {actual[:12]}..., expected "
                          f"{str(expected)[:12]}... (a broken install?)")
    return folder


def _bench_model(name: str, info: dict, weights: Path):
    """The bench model recorded in `info` (``model``: its ``ModelConfig``) with the weights of `weights`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from trimkit.bench.models import ModelConfig, build_model

    try:
        config = ModelConfig(**info["model"])
    except (KeyError, TypeError) as err:
        raise ConfigError(f"shipped model {name!r}: {INFO_FILE} has no valid bench model config ({err})") from None
    model = build_model(config)
    try:
        load_model(model, str(weights))
    except (SafetensorError, RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"shipped model {name!r}: {weights} does not fit its config ({first})") from None
    return model.eval()


def bench_trained_backbone(name: str, eval_items: int = 256):
    """A shipped model of the bench format (``"format": "bench"`` in :data:`INFO_FILE`): the bench
    model of its ``ModelConfig`` (:func:`trimkit.bench.models.build_model`) with the checked weights,
    as a `Backbone` whose example inputs are the first `eval_items` validation items of its data."""
    from trimkit.backbones.base import Backbone, TaskAdapter
    from trimkit.bench.backbone import DataInputs

    info = trained_info(name)
    model = _bench_model(name, info, trained_folder(name) / WEIGHTS_FILE)
    c = model.config
    make_inputs = DataInputs(f"{info['data']}&split=val&n={eval_items}", "vqa", c.patch, c.image)
    task = TaskAdapter("classification", key="logits", num_labels=c.num_labels)
    hints = {"family": f"bench-{c.family}", "task_name": "vqa", "num_labels": c.num_labels, "data": info["data"],
             **make_inputs.hints(c.max_text_len)}
    return Backbone(name=name, model=model, task=task, make_inputs=make_inputs, hints=hints, source="registry")
