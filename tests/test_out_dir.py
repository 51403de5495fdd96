"""Output folders: checked before any work, replaced only by a complete result; damaged saved
folders and bad API inputs give one-line errors naming the file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import trimkit
from trimkit.backbones import load_backbone
from trimkit.errors import ConfigError
from trimkit.io import prepare_out_dir, safetensors_problem, save_folder, staged_out_dir
from trimkit.passes import Int8DynamicConfig, apply_, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "tests" / "models" / "toy_vlms.py") + ":two_stream"


def _trimkit_folder(where: Path) -> Path:
    where.mkdir(parents=True)
    (where / "trimkit.json").write_text("{}")
    return where


# ----------------------------------------------------------------------------------------------
# prepare_out_dir
# ----------------------------------------------------------------------------------------------
def test_new_and_empty_folders_are_accepted_and_nothing_is_written(tmp_path):
    assert prepare_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    (tmp_path / "empty").mkdir()
    assert prepare_out_dir(str(tmp_path / "empty")) == tmp_path / "empty"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_a_foreign_folder_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ConfigError) as info:
            prepare_out_dir(str(tmp_path), overwrite=overwrite)
        assert str(info.value) == (f"--out {str(tmp_path)!r} is not empty and is not a trimkit folder; "
                                   "choose another (nothing was written)")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_a_saved_model_needs_overwrite(tmp_path):
    out = _trimkit_folder(tmp_path / "old")
    with pytest.raises(ConfigError) as info:
        prepare_out_dir(str(out))
    assert str(info.value) == (f"--out {str(out)!r} already holds a saved model; add --overwrite to replace it "
                               "(nothing was written)")
    assert prepare_out_dir(str(out), overwrite=True) == out
    with pytest.raises(ConfigError, match="add overwrite=True to replace it"):
        prepare_out_dir(out, label="output folder")


def test_training_checkpoints_need_overwrite_or_resume(tmp_path):
    (tmp_path / "run" / "checkpoints" / "step-000002").mkdir(parents=True)
    run = str(tmp_path / "run")
    with pytest.raises(ConfigError) as info:
        prepare_out_dir(run)
    assert str(info.value) == (f"--out {run!r} already holds training checkpoints; add --overwrite to replace it "
                               "or --resume to continue it (nothing was written)")
    assert prepare_out_dir(run, resume=True) == Path(run)
    assert prepare_out_dir(run, overwrite=True) == Path(run)


def test_resume_needs_checkpoints(tmp_path):
    out = _trimkit_folder(tmp_path / "done")
    with pytest.raises(ConfigError) as info:
        prepare_out_dir(str(out), resume=True)
    assert str(info.value) == f"nothing to resume: --out {str(out)!r} holds no training checkpoints"


def test_unwritable_places_name_the_path_typed(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as info:
        prepare_out_dir(str(tmp_path / "file"))
    assert str(info.value) == f"--out {str(tmp_path / 'file')!r} exists and is not a folder"
    with pytest.raises(ConfigError) as info:
        prepare_out_dir(str(tmp_path / "file" / "sub"))
    assert str(info.value) == (f"--out {str(tmp_path / 'file' / 'sub')!r} cannot be written: "
                               f"{str(tmp_path / 'file')!r} is not a folder")
    with pytest.raises(ConfigError) as info:
        prepare_out_dir("/proc/trimkit-out")
    assert str(info.value) == "--out '/proc/trimkit-out' cannot be written (No such file or directory)"


# ----------------------------------------------------------------------------------------------
# staged_out_dir
# ----------------------------------------------------------------------------------------------
def test_staging_replaces_the_old_folder_only_when_complete(tmp_path):
    out = _trimkit_folder(tmp_path / "out")
    with staged_out_dir(out) as staging:
        assert staging.parent == tmp_path and staging != out
        (staging / "new.txt").write_text("new")
        assert (out / "trimkit.json").is_file()  # still the old one while writing
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failure_leaves_the_old_folder_and_no_staging(tmp_path, error):
    out = _trimkit_folder(tmp_path / "out")
    with pytest.raises(type(error)):
        with staged_out_dir(out) as staging:
            (staging / "half.txt").write_text("half")
            raise error
    assert sorted(p.name for p in out.iterdir()) == ["trimkit.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_keep_partial_writes_in_place_when_there_is_nothing_to_protect(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with staged_out_dir(out, keep_partial=True) as where:
            assert where == out
            (where / "checkpoint.txt").write_text("step 3")
            raise KeyboardInterrupt
    assert (out / "checkpoint.txt").read_text() == "step 3"


# ----------------------------------------------------------------------------------------------
# Damaged folders
# ----------------------------------------------------------------------------------------------
def test_safetensors_problem_reads_the_header_only(tmp_path):
    file = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(3)}, str(file))
    assert safetensors_problem(file) is None
    size = file.stat().st_size
    header = int.from_bytes(file.read_bytes()[:8], "little")
    assert safetensors_problem(tmp_path / "none.safetensors") == "missing"
    file.write_bytes(file.read_bytes()[: size - 4])
    assert safetensors_problem(file) == f"truncated: {size - 4} of {size} bytes"
    file.write_bytes(file.read_bytes()[:20])
    assert safetensors_problem(file) == f"truncated: the header says {header} bytes, the file has 12 after it"
    file.write_bytes(b"abc")
    assert safetensors_problem(file) == "truncated: 3 bytes, shorter than a safetensors header"
    file.write_bytes((4).to_bytes(8, "little") + b"nope")
    assert safetensors_problem(file) == "not a safetensors file (its header is not JSON)"


@pytest.fixture(scope="module")
def saved_toy(tmp_path_factory) -> Path:
    backbone = load_backbone(TOY)
    apply_(backbone.model, Int8DynamicConfig(), inputs=backbone.example_inputs(2))
    return save_folder(tmp_path_factory.mktemp("saved") / "toy", base_ref=TOY, model=backbone.model)


def _damaged(saved: Path, tmp_path: Path, damage) -> str:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    damage(copy)
    with pytest.raises(ConfigError) as info:
        trimkit.load(copy)
    with pytest.raises(ConfigError) as again:
        load_backbone(str(copy))
    assert str(again.value) == str(info.value)
    return str(info.value).replace(str(copy), "DIR")


def _truncate(file: Path, keep: int) -> None:
    file.write_bytes(file.read_bytes()[:keep])


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "trimkit.json").unlink(), "trimkit folder 'DIR': trimkit.json is missing"),
    (lambda d: (d / "trimkit.json").write_text("{not json"),
     "trimkit folder 'DIR': trimkit.json is damaged (Expecting property name enclosed in double quotes: "
     "line 1 column 2 (char 1))"),
    (lambda d: __import__("shutil").rmtree(d / "base"), "trimkit folder 'DIR': base/ (the base model) is missing"),
    (lambda d: (d / "base" / "model.safetensors").unlink(), "trimkit folder 'DIR': base/model.safetensors is missing"),
    (lambda d: _truncate(d / "model.safetensors", 100),
     "trimkit folder 'DIR': model.safetensors is damaged (truncated: the header says"),
    (lambda d: _truncate(d / "base" / "model.safetensors", -10),
     "trimkit folder 'DIR': base/model.safetensors is damaged (truncated: "),
])
def test_damaged_folders_name_the_file(saved_toy, tmp_path, damage, message):
    assert _damaged(saved_toy, tmp_path, damage).startswith(message)


def test_a_damaged_hugging_face_base_names_its_file(tmp_path):
    backbone = load_backbone("vilt-vqa-tiny")
    apply_(backbone.model, Int8DynamicConfig(), inputs=backbone.example_inputs(2))
    out = save_folder(tmp_path / "vilt", base_ref="vilt-vqa-tiny", model=backbone.model)
    (out / "base" / "config.json").unlink()
    with pytest.raises(ConfigError) as info:
        trimkit.load(out)
    assert str(info.value) == f"trimkit folder {str(out)!r}: base/config.json is missing"


@pytest.mark.parametrize("value", [None, "", 3])
def test_load_needs_a_path(value):
    with pytest.raises(ConfigError) as info:
        trimkit.load(value)
    assert str(info.value) == f"a saved folder is a path (str or os.PathLike), got {value!r}"


def test_load_of_a_plain_folder_says_it_is_not_a_trimkit_folder(tmp_path):
    with pytest.raises(ConfigError) as info:
        trimkit.load(tmp_path)
    assert str(info.value) == f"{str(tmp_path)!r} is not a trimkit folder (no trimkit.json)"


# ----------------------------------------------------------------------------------------------
# Passes: API inputs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("configs, message", [
    ("string", "recipe 'string' is neither a file nor TOML text ([[pass]] tables)"),
    ("int8.dynamic", "'int8.dynamic' is a pass name, not a recipe: give its config (pass_config('int8.dynamic')()) "
                     "or a recipe with [[pass]] name = 'int8.dynamic'"),
    ("missing.toml", "recipe file 'missing.toml' not found"),
    (None, "passes are a PassConfig, a list of them, or a recipe's text or path; got NoneType"),
    (5, "passes are a PassConfig, a list of them, or a recipe's text or path; got int"),
])
def test_apply_with_bad_configs_is_one_config_error(configs, message):
    with pytest.raises(ConfigError) as info:
        apply_(nn.Linear(2, 2), configs)
    assert str(info.value) == message


def test_apply_to_something_else_than_a_module():
    with pytest.raises(ConfigError) as info:
        apply_("clip-tiny", Int8DynamicConfig())
    assert str(info.value) == "apply_ needs a torch.nn.Module, got str"


def test_a_recipe_that_is_not_toml_says_so_with_line_and_column():
    with pytest.raises(ConfigError) as info:
        parse_recipe("not toml [")
    assert str(info.value) == "recipe: invalid TOML: Expected '=' after a key in a key/value pair (at line 1, column 5)"


def test_saved_example_inputs_feed_the_passes_on_load(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=50)
    from trimkit.backbones import Backbone, TaskAdapter
    from trimkit.backbones.inputs import RepeatBatch

    model = transformers.BertModel(config).eval()
    embeds = torch.randn(2, 9, 32)
    backbone = Backbone(name="embeds", model=model, task=TaskAdapter("features", key=None),
                        make_inputs=RepeatBatch({"inputs_embeds": embeds}), source="factory")
    apply_(model, Int8DynamicConfig(), inputs=backbone.example_inputs(2))
    out = save_folder(tmp_path / "embeds", base_ref="unused", model=model, example_inputs={"inputs_embeds": embeds},
                      base_model_dir_writer=lambda where: transformers.BertModel(config).save_pretrained(str(where)))
    assert json.loads((out / "trimkit.json").read_text())["inputs"] == {"order": ["inputs_embeds"], "values": {}}
    restored = trimkit.load(out)
    example = restored.example_inputs(2)
    assert list(example) == ["inputs_embeds"] and torch.equal(example["inputs_embeds"], embeds)
    with torch.no_grad():
        torch.testing.assert_close(restored.model(**example).last_hidden_state, model(**example).last_hidden_state,
                                   rtol=0, atol=0)
