from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from trimkit.cli import cli
from trimkit.device import float32_logits, peak_memory, place, resolve_device, resolve_dtype
from trimkit.errors import ConfigError
from trimkit.evaluate import evaluate
from trimkit.passes import trainable_parameters
from trimkit.train import TrainConfig, prepare, train

TOY = str(Path(__file__).resolve().parents[1] / "models" / "toy_vlms.py") + ":two_stream"
TOY_DATA = "synthetic:truefalse?n=16"
FAST = dict(batch_size=8, measure_every=0, calibrate=0)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def _toy(tokens_recipe, steps=2, **kw):
    return train(TOY, TOY_DATA, target_ratio=0.6, steps=steps, recipe=tokens_recipe, config=TrainConfig(**FAST, **kw),
                 progress=False)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_an_unavailable_device_is_one_line(name):
    with pytest.raises(ConfigError, match=f"device '{name}' is not available.*use --device cpu"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["gpu", "cpu:0", "cuda:x"])
def test_unknown_device_names(name):
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device(name)


def test_dtype_names():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(None) is torch.float32
    with pytest.raises(ConfigError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")


@no_cuda
def test_train_on_a_missing_gpu_is_a_one_line_error(tokens_recipe, tmp_path):
    result = CliRunner().invoke(cli, ["train", "--model", "vilt-vqa-tiny", "--recipe", tokens_recipe, "--data",
                                      "synthetic:vqa?n=16", "--steps", "1", "--out", str(tmp_path / "o"),
                                      "--device", "cuda"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: device 'cuda' is not available: this torch build sees no CUDA GPU (torch {torch.__version__}); "
        "use --device cpu"]


def test_trimmer_logits_stay_float32_in_a_bfloat16_model():
    class Scorer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 1)

        @float32_logits
        def forward(self, x):
            return self.fc(x)

    x = torch.randn(2, 4, dtype=torch.bfloat16)
    assert Scorer()(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert Scorer()(x.float()).dtype == torch.float32


@pytest.mark.slow
def test_bfloat16_training_keeps_trained_weights_float32_and_evaluates(tokens_recipe, tmp_path):
    result = train("vilt-vqa-tiny", "synthetic:vqa?n=32", target_ratio=0.5, steps=2, recipe=tokens_recipe,
                   config=TrainConfig(**FAST, dtype="bfloat16", trainable="trimmers"), out_dir=tmp_path / "o",
                   progress=False)
    assert all(np.isfinite(r["loss"]) for r in result.history)
    trimmers = {id(p) for p in trainable_parameters(result.model)}
    dtypes = {(id(p) in trimmers, p.dtype) for p in result.model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    assert "peak_mib" in result.history[-1]
    report = evaluate(tmp_path / "o", "synthetic:vqa?n=16", samples=2, latency=False, dtype="bfloat16")
    assert report["dtype"] == "bfloat16" and np.isfinite(report["metric"]["value"])
    assert np.isfinite(report["flops_ratio"])  # trimmer overhead can exceed what 2 steps prune


def test_float16_training_scales_the_loss(tokens_recipe):
    result = _toy(tokens_recipe, dtype="float16", trainable="trimmers+norms")
    assert all(np.isfinite(r["loss"]) for r in result.history)


def test_place_keeps_trimmers_float32(tokens_recipe):
    model = _toy(tokens_recipe, steps=1).model
    place(model, "cpu", "bfloat16")
    trimmers = {id(p) for p in trainable_parameters(model)}
    assert all((p.dtype == torch.float32) == (id(p) in trimmers) for p in model.parameters())


def test_gradient_checkpointing_changes_no_result(tokens_recipe):
    plain, checked = _toy(tokens_recipe), _toy(tokens_recipe, grad_checkpointing=True)
    a, b = _weights(plain.model), _weights(checked.model)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    assert [r["loss"] for r in plain.history] == pytest.approx([r["loss"] for r in checked.history], abs=1e-6)


@pytest.mark.parametrize("mode", ["trimmers", "trimmers+norms"])
def test_trainable_selection(tokens_recipe, mode):
    torch.manual_seed(0)  # as train() seeds before it applies the recipe
    before = _weights(prepare(TOY, TOY_DATA, recipe=tokens_recipe)[0].model)
    after_model = _toy(tokens_recipe, steps=2, trainable=mode).model
    after = _weights(after_model)
    modules = dict(after_model.named_modules())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    trimmer_names = {n for n, p in after_model.named_parameters()
                     if any(p is q for q in trainable_parameters(after_model))}
    assert trimmer_names & moved
    others = moved - trimmer_names
    if mode == "trimmers":
        assert not others
    else:
        assert others and all("norm" in type(modules[n.rsplit(".", 1)[0]]).__name__.lower() for n in others)


def test_lora_trains_adapters_and_merges_them(tokens_recipe, tmp_path):
    pytest.importorskip("peft")
    result = train(TOY, TOY_DATA, target_ratio=0.6, steps=2, recipe=tokens_recipe,
                   config=TrainConfig(**FAST, trainable="lora", lr_backbone=1e-2), out_dir=tmp_path / "o",
                   progress=False)
    assert not any("lora_" in n for n, _ in result.model.named_parameters())
    assert not any(hasattr(m, "base_layer") for m in result.model.modules())
    assert all(np.isfinite(r["loss"]) for r in result.history)


def test_lora_without_peft_is_a_clear_error(tokens_recipe, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(ConfigError, match=r"needs the peft package: pip install 'trimkit\[lora\]'"):
        _toy(tokens_recipe, steps=1, trainable="lora")


def test_worker_processes_read_the_same_batches(tokens_recipe):
    plain, loaded = _toy(tokens_recipe), _toy(tokens_recipe, workers=2)
    assert [r["loss"] for r in plain.history] == [r["loss"] for r in loaded.history]


def test_placement_settings_are_not_part_of_a_checkpoint():
    data = TrainConfig(device="cpu", workers=3, grad_checkpointing=True).to_dict()
    assert not {"device", "workers", "grad_checkpointing", "dtype", "trainable", "lora_rank"} & set(data)
    assert TrainConfig(dtype="bfloat16").to_dict()["dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="contradicts trainable"):
        TrainConfig(freeze_backbone=True, trainable="lora")


def test_peak_memory_names_its_source():
    mib, source = peak_memory(torch.device("cpu"))
    assert mib > 0 and source == "ru_maxrss"


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_on_cuda(tokens_recipe, dtype):
    result = _toy(tokens_recipe, device="cuda", dtype=dtype)
    assert next(result.model.parameters()).device.type == "cuda"
    assert all(np.isfinite(r["loss"]) for r in result.history)
    assert result.history[-1]["peak_mib"] > 0


def test_nproc_is_left_out_of_what_each_process_runs():
    from trimkit.cli.train_cmd import _without_nproc

    assert _without_nproc(["train", "--nproc", "2", "--steps", "3", "--nproc=4", "--json"]) == \
        ["train", "--steps", "3", "--json"]


def test_train_help_lists_the_new_options():
    out = CliRunner().invoke(cli, ["train", "--help"]).output
    for flag in ("--device", "--dtype", "--trainable", "--grad-checkpointing", "--workers", "--nproc"):
        assert flag in out
    assert "--device" in CliRunner().invoke(cli, ["eval", "--help"]).output


@no_cuda
def test_apply_and_eval_refuse_a_missing_gpu_in_one_line(tmp_path):
    for args in (["apply", "--model", "vilt-vqa-tiny", "--out", str(tmp_path / "a"), "--data", "synthetic:vqa?n=8"],
                 ["eval", "--model", "vilt-vqa-tiny", "--data", "synthetic:vqa?n=8"]):
        result = CliRunner().invoke(cli, [*args, "--device", "cuda"])
        assert result.exit_code == 1
        assert result.output.startswith("Error: device 'cuda' is not available") and result.output.count("\n") == 1


def test_apply_without_data_runs_in_float32_only(tmp_path):
    result = CliRunner().invoke(cli, ["apply", "--model", "vilt-vqa-tiny", "--out", str(tmp_path / "a"),
                                      "--dtype", "bfloat16"])
    assert result.exit_code == 1 and "without --data, apply profiles on cpu in float32" in result.output
