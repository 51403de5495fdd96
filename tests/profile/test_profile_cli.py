"""`trimkit profile`: option checks, JSON contract, recipe handling."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from trimkit.cli import cli

FACTORY = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        return self.head(self.layer(self.embed(ids))[:, 0])


def factory():
    torch.manual_seed(0)
    return Tiny(), {"ids": torch.randint(0, 30, (2, 5))}
'''


@pytest.fixture()
def factory_ref(tmp_path):
    pytest.importorskip("trimkit.backbones", reason="the backbones loader is not importable")
    from trimkit import backbones

    if not hasattr(backbones, "load_backbone"):
        pytest.skip("trimkit.backbones has no load_backbone yet")
    path = tmp_path / "tiny_model.py"
    path.write_text(FACTORY)
    return f"{path}:factory"


@pytest.mark.parametrize("args, message", [
    (["--samples", "0"], "Invalid value for '--samples'"),
    (["--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["--batch-size", "-3"], "Invalid value for '--batch-size'"),
    (["--threads", "0"], "Invalid value for '--threads'"),
    (["--counter", "flopz"], "Invalid value for '--counter'"),
])
def test_bad_options_are_refused(args, message):
    result = CliRunner().invoke(cli, ["profile", "--model", "unused", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_model_is_required():
    result = CliRunner().invoke(cli, ["profile"])
    assert result.exit_code == 2
    assert "Missing option '--model'" in result.output


def test_json_report_has_the_contract_keys(factory_ref):
    result = CliRunner().invoke(cli, ["profile", "--model", factory_ref, "--json", "--samples", "2",
                                      "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # JSON alone on stdout
    assert {"unit", "flops", "elementwise_flops", "params", "trimmer_params", "latency_ms",
            "peak_memory_mb", "blocks", "stats"} <= set(report)
    assert report["unit"] == "FLOPs"
    assert set(report["flops"]) == {"mean", "p50", "p95"}
    assert set(report["latency_ms"]) == {"batch_1", "batch_3"}
    n, d = 5, 8
    layer = 2 * d * d * 3 * n + 4 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * 16
    assert report["flops"]["mean"] == layer + 2 * d * 2
    assert all({"path", "flops"} <= set(b) for b in report["blocks"])
    assert result.stderr == ""  # no progress with --json


def test_table_output_and_by_block(factory_ref):
    result = CliRunner().invoke(cli, ["profile", "--model", factory_ref, "--samples", "1",
                                      "--batch-size", "2", "--by-block", "--counter", "fvcore"])
    assert result.exit_code == 0, result.output
    assert "FLOPs / sample (mean)" in result.stdout
    assert "latency batch 2" in result.stdout
    assert "blocks" in result.stdout
    phases = [line.split("  ")[0] for line in result.stderr.splitlines()]  # plain progress lines in a log
    assert phases == ["counting FLOPs (fvcore) 0/1", "counting FLOPs (fvcore) 1/1",
                      "measuring latency 0/2", "measuring latency 1/2", "measuring latency 2/2"]
    assert "counting" not in result.stdout


def test_unknown_model_is_one_line_error():
    pytest.importorskip("trimkit.backbones")
    result = CliRunner().invoke(cli, ["profile", "--model", "no-such-model-tiny"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")
    assert result.stderr.count("\n") == 1


def test_recipe_without_passes_support_is_one_line_error(factory_ref, tmp_path, monkeypatch):
    import trimkit.passes

    monkeypatch.delattr(trimkit.passes, "apply_recipe", raising=False)
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "int8.dynamic"\n')
    result = CliRunner().invoke(cli, ["profile", "--model", factory_ref, "--recipe", str(recipe)])
    assert result.exit_code == 1
    assert result.stderr == ("Error: recipes need the passes module: "
                             "trimkit.passes.apply_recipe is missing\n")


def test_recipe_reports_before_after_and_speedup(factory_ref, tmp_path, monkeypatch):
    import trimkit.passes

    seen = {}

    def fake_apply(model, recipe_path, model_map):
        seen["recipe"] = recipe_path
        model.layer.linear2.register_forward_pre_hook(lambda m, a: None)
        return model

    monkeypatch.setattr(trimkit.passes, "apply_recipe", fake_apply, raising=False)
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "noop"\n')
    result = CliRunner().invoke(cli, ["profile", "--model", factory_ref, "--recipe", str(recipe),
                                      "--json", "--samples", "1", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"before", "after", "speedup"}
    assert seen["recipe"] == str(recipe)
    assert report["speedup"]["flops"] == pytest.approx(1.0)
    assert {"flops", "latency_batch_1", "latency_batch_2"} <= set(report["speedup"])


def _profile_json(ref, *args):
    result = CliRunner().invoke(cli, ["profile", "--model", ref, "--json", "--samples", "2",
                                      "--batch-size", "2", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cpu_float32_is_the_default_placement(factory_ref):
    default = _profile_json(factory_ref)
    explicit = _profile_json(factory_ref, "--device", "cpu", "--dtype", "float32")
    assert (default["device"], default["dtype"]) == ("cpu", "float32")
    assert (explicit["device"], explicit["dtype"]) == ("cpu", "float32")
    assert explicit["flops"] == default["flops"]
    n, d = 5, 8
    layer = 2 * d * d * 3 * n + 4 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * 16
    assert explicit["flops"]["mean"] == layer + 2 * d * 2


def test_bfloat16_on_cpu_runs_and_reports_its_dtype(factory_ref):
    f32 = _profile_json(factory_ref)
    bf16 = _profile_json(factory_ref, "--dtype", "bfloat16")
    assert (bf16["device"], bf16["dtype"]) == ("cpu", "bfloat16")
    assert bf16["flops"]["mean"] == f32["flops"]["mean"]  # same matmuls, lower precision
    assert all(v is not None and v > 0 for v in bf16["latency_ms"].values())


def test_bfloat16_table_names_device_and_dtype(factory_ref):
    result = CliRunner().invoke(cli, ["profile", "--model", factory_ref, "--samples", "1",
                                      "--batch-size", "2", "--dtype", "bfloat16", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "cpu / bfloat16" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_missing_cuda_is_one_line(factory_ref):
    result = CliRunner().invoke(cli, ["profile", "--model", factory_ref, "--device", "cuda"])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "cuda" in lines[0] and "not available" in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_profile_on_cuda(factory_ref, dtype):
    report = _profile_json(factory_ref, "--device", "cuda", "--dtype", dtype)
    assert report["device"].startswith("cuda") and report["dtype"] == dtype
    assert report["flops"]["mean"] == _profile_json(factory_ref)["flops"]["mean"]
    assert all(v > 0 for v in report["latency_ms"].values())
