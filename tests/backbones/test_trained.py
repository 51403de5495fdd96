"""Shipped trained models: registry names that load package folders, checked by hash."""
import fnmatch
import json
import shutil

import pytest
import torch

from trimkit.backbones import list_backbones, list_trained, load_backbone, trained_info
from trimkit.backbones import trained as trained_mod
from trimkit.bench.where import predictions
from trimkit.data import load_dataset
from trimkit.errors import ConfigError, UnknownModelError

NAME = "vilt-vqa-where"


def test_the_where_base_is_shipped_with_its_record():
    assert NAME in list_trained() and NAME not in list_backbones()
    info = trained_info(NAME)
    folder = trained_mod.TRAINED_DIR / NAME
    assert info["sha256"]["model.safetensors"] == trained_mod.weights_sha256(folder / "model.safetensors")
    assert info["val"]["n"] >= 1000 and info["val"]["accuracy"] >= 0.85
    assert info["blind_prior"]["val"]["accuracy"] <= 0.40
    assert info["command"].startswith("python benchmarks/train_where_base.py")
    assert json.loads((folder / "record.json").read_text())["log"], "the training log is shipped"
    assert (folder / "model.safetensors").stat().st_size < 8_000_000


def test_the_wheel_globs_cover_every_shipped_file():
    import runpy
    from pathlib import Path
    from unittest import mock

    root = Path(__file__).resolve().parents[2]
    with mock.patch("setuptools.setup") as setup:
        runpy.run_path(str(root / "setup.py"))
    globs = setup.call_args.kwargs["package_data"]["trimkit.backbones"]
    for path in (root / "backbones" / "trained").rglob("*"):
        if path.is_file():
            rel = path.relative_to(root / "backbones").as_posix()
            assert any(fnmatch.fnmatch(rel, g) for g in globs), rel


def test_the_registry_name_loads_the_trained_model_which_answers_from_the_image():
    bb = load_backbone(NAME)
    info = trained_info(NAME)
    assert type(bb.model).__name__ == "ViltForQuestionAnswering" and bb.hints["data"] == info["data"]
    assert bb.model.config.vocab_size == len(info["vocab"]) and bb.task.num_labels == len(info["answers"])
    assert bb.hints["special_tokens"]["text"] == [0, -1]  # [CLS] and [SEP] of the data's tokenizer
    val = load_dataset(info["data"] + "&n=64&split=val")
    assert val.tokenizer.id_to_word == info["vocab"] and val.answers == info["answers"]
    pred = predictions(bb.model, val)
    right = sum(p == val.record(i).label for i, p in enumerate(pred))
    assert right / len(val) >= 0.8
    blank = [dict(val[i], pixel_values=torch.zeros_like(val[i]["pixel_values"])) for i in range(len(val))]
    blank_pred = predictions(bb.model, blank)
    assert sum(p == val.record(i).label for i, p in enumerate(blank_pred)) / len(val) < 0.6  # needs the image


def test_broken_weights_are_one_line(tmp_path, monkeypatch):
    shutil.copytree(trained_mod.TRAINED_DIR / NAME, tmp_path / NAME)
    with open(tmp_path / NAME / "model.safetensors", "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    monkeypatch.setattr(trained_mod, "TRAINED_DIR", tmp_path)
    trained_mod.trained_info.cache_clear()
    try:
        with pytest.raises(ConfigError, match="SHA-256") as info:
            load_backbone(NAME)
        assert "\n" not in str(info.value)
    finally:
        trained_mod.trained_info.cache_clear()


def test_unknown_names_list_the_shipped_models():
    with pytest.raises(UnknownModelError, match=NAME):
        load_backbone("./no-such-model-folder")
