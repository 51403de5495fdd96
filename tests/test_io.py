"""Saved folders: exact round trips (plain PyTorch and Hugging Face), no pickles, atomic writes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

from trimkit.backbones import load_backbone
from trimkit.errors import ConfigError, TrimkitError
from trimkit.io import load_folder, read_manifest, save_folder
from trimkit.locate import ModelMap
from trimkit.passes import (
    Int8DynamicConfig,
    Int8DynamicLinear,
    PassConfig,
    PassContext,
    PassResult,
    apply_,
    config_to_dict,
    register_pass,
    registered_passes,
)
from trimkit.passes import registry as registry_mod

ROOT = Path(__file__).resolve().parents[1]
TOY_REF = "tests/models/toy_vlms.py:two_stream"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt"}


@dataclass(frozen=True)
class GateConfig(PassConfig):
    """Adds a trainable gate on one Linear's output (random init unless restoring)."""

    name: ClassVar[str] = "test.gate"
    tags: ClassVar[tuple[str, ...]] = ("trim",)
    target: str = "head"


class Gate(nn.Module):
    trimkit_role = "trimmer"
    trimkit_no_quant = True

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(width) + 0.5)


RESTORING_SEEN: list[bool] = []


def gate_pass(model, model_map, config: GateConfig, context: PassContext) -> PassResult:
    RESTORING_SEEN.append(context.restoring)
    layer = model.get_submodule(config.target)
    gate = Gate(layer.out_features)
    model.trimkit_gate = gate
    handle = layer.register_forward_hook(lambda mod, args, out: out * gate.scale)

    def undo():
        handle.remove()
        del model.trimkit_gate

    return PassResult(model, {}, undo=undo, trainable=True)


@pytest.fixture
def gate_registered():
    registered_passes()
    saved = dict(registry_mod._REGISTRY)
    register_pass(GateConfig)(gate_pass)
    yield
    registry_mod._REGISTRY.clear()
    registry_mod._REGISTRY.update(saved)


@pytest.fixture(scope="module")
def toy_map() -> ModelMap:
    from trimkit.locate import locate

    backbone = load_backbone(str(ROOT / TOY_REF))
    return locate(backbone.model, backbone.example_inputs(2))


def files_of(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def outputs(backbone, inputs):
    with torch.no_grad():
        return backbone.task.logits(backbone.model(**inputs))


def test_factory_round_trip_with_int8_and_trainable_gate(tmp_path, monkeypatch, toy_map, gate_registered):
    monkeypatch.chdir(ROOT)
    backbone = load_backbone(TOY_REF)
    inputs = backbone.example_inputs(2)
    RESTORING_SEEN.clear()
    with torch.random.fork_rng():
        torch.manual_seed(123)  # the gate's random init differs from the one the reload would draw
        apply_(backbone.model, [GateConfig(), Int8DynamicConfig()], model_map=toy_map)
    expected = outputs(backbone, inputs)
    out = save_folder(tmp_path / "saved", base_ref=TOY_REF, model=backbone.model, extra={"note": "toy"})

    assert files_of(out) == ["base/model.safetensors", "model.safetensors", "trimkit.json"]
    assert not {p.suffix for p in out.rglob("*")} & PICKLE_SUFFIXES
    manifest = read_manifest(out)
    assert manifest["format"] == 1 and manifest["base"]["ref"] == TOY_REF and manifest["base"]["kind"] == "factory"
    assert manifest["recipe"] == [config_to_dict(GateConfig()), config_to_dict(Int8DynamicConfig())]
    assert manifest["map"] == json.loads(json.dumps(toy_map.to_dict())) and manifest["extra"] == {"note": "toy"}
    assert {"trimkit", "torch", "safetensors"} <= set(manifest["versions"])

    monkeypatch.chdir(tmp_path)  # the relative factory path must still resolve
    for restored in (load_folder(out), load_backbone(str(out))):
        assert restored.source == "trimkit"
        assert isinstance(restored.model.text[0].mlp[0], Int8DynamicLinear)
        assert torch.equal(outputs(restored, inputs), expected)
    assert RESTORING_SEEN == [False, True, True]


def test_hf_round_trip_with_int8(tmp_path):
    backbone = load_backbone("vilt-vqa-tiny")
    inputs = backbone.example_inputs(2)
    apply_(backbone.model, Int8DynamicConfig(), inputs=inputs)
    expected = outputs(backbone, inputs)
    out = save_folder(tmp_path / "vilt", base_ref="vilt-vqa-tiny", model=backbone.model)
    assert read_manifest(out)["base"]["kind"] == "hf"
    assert {"base/config.json", "model.safetensors", "trimkit.json"} <= set(files_of(out))
    assert not {p.suffix for p in out.rglob("*")} & PICKLE_SUFFIXES
    restored = load_backbone(str(out))
    assert type(restored.model) is type(backbone.model)
    assert torch.equal(outputs(restored, inputs), expected)


def test_failed_write_leaves_nothing(tmp_path, toy_map):
    backbone = load_backbone(str(ROOT / TOY_REF))
    apply_(backbone.model, Int8DynamicConfig(), model_map=toy_map)

    def broken_writer(where: Path) -> None:
        (where / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_folder(tmp_path / "out", base_ref=TOY_REF, model=backbone.model, base_model_dir_writer=broken_writer)
    assert list(tmp_path.iterdir()) == []


def test_writer_that_pickles_is_refused(tmp_path, toy_map):
    backbone = load_backbone(str(ROOT / TOY_REF))
    apply_(backbone.model, Int8DynamicConfig(), model_map=toy_map)

    def pickling_writer(where: Path) -> None:
        torch.save(backbone.model.state_dict(), where / "pytorch_model.bin")
        (where / "config.json").write_text("{}")

    with pytest.raises(TrimkitError, match="pickled files: base/pytorch_model.bin"):
        save_folder(tmp_path / "out", base_ref=TOY_REF, model=backbone.model, base_model_dir_writer=pickling_writer)
    assert list(tmp_path.iterdir()) == []


def test_existing_folders_are_protected(tmp_path, toy_map):
    backbone = load_backbone(str(ROOT / TOY_REF))
    apply_(backbone.model, Int8DynamicConfig(), model_map=toy_map)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a trimkit folder"):
        save_folder(other, base_ref=TOY_REF, model=backbone.model)
    assert (other / "notes.txt").read_text() == "keep me"

    out = save_folder(tmp_path / "saved", base_ref=TOY_REF, model=backbone.model)
    with pytest.raises(ConfigError, match="already holds a saved model"):
        save_folder(out, base_ref=TOY_REF, model=backbone.model)
    save_folder(out, base_ref=TOY_REF, model=backbone.model, extra={"v": 2}, overwrite=True)
    assert read_manifest(out)["extra"] == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "saved"]


def test_save_needs_a_map():
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="needs the model map"):
        save_folder("unused", base_ref=TOY_REF, model=model)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format=2), "has format 2"),
    (lambda m: m.pop("recipe"), "lacks recipe"),
    (lambda m: m["recipe"].append({"_type": "os.system", "_version": 1, "_data": {}}), "unknown pass 'os.system'"),
    (lambda m: m["base"].update(kind="zip"), "unknown base kind 'zip'"),
])
def test_bad_manifests_are_config_errors(tmp_path, toy_map, edit, message):
    backbone = load_backbone(str(ROOT / TOY_REF))
    apply_(backbone.model, Int8DynamicConfig(), model_map=toy_map)
    out = save_folder(tmp_path / "saved", base_ref=str(ROOT / TOY_REF), model=backbone.model)
    manifest = json.loads((out / "trimkit.json").read_text())
    edit(manifest)
    (out / "trimkit.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=message):
        load_folder(out)


def test_weights_that_do_not_fit_are_one_line_errors(tmp_path, toy_map):
    backbone = load_backbone(str(ROOT / TOY_REF))
    apply_(backbone.model, Int8DynamicConfig(), model_map=toy_map)
    out = save_folder(tmp_path / "saved", base_ref=str(ROOT / TOY_REF), model=backbone.model)
    manifest = json.loads((out / "trimkit.json").read_text())
    manifest["recipe"] = []  # the saved int8 buffers no longer have a home
    (out / "trimkit.json").write_text(json.dumps(manifest))
    with pytest.raises(TrimkitError, match=r"weights in .* do not fit the rebuilt model") as info:
        load_folder(out)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    assert "29 missing (" in message and "58 unexpected (" in message and "and 26 more" in message
