"""`trimkit bench --speed` plumbing on tiny configs: the published sizes, the JSON fields, and the
table generated from them."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from trimkit.bench.published import PUBLISHED, published_model
from trimkit.bench.speed import (SpeedConfig, centre_token_logits, interleaved_times, randomise_trimmers, run_speed,
                                 shared_copy)
from trimkit.bench.speed_report import (SPEED_END, SPEED_START, SUMMARY_END, SUMMARY_START, build_speed_report,
                                        load_speed_run, newest_per_model, timed_reduction)
from trimkit.cli import cli
from trimkit.errors import ConfigError


def test_published_sizes_and_layer_cut():
    blip = published_model("blip").config_kwargs(4)
    assert blip["vision_config"]["image_size"] // blip["vision_config"]["patch_size"] == 24  # 576 patches + CLS
    assert blip["vision_config"]["num_hidden_layers"] == blip["text_config"]["num_hidden_layers"] == 4
    assert blip["text_config"]["num_attention_heads"] == 12
    bt = published_model("bridgetower-base")
    assert bt.config_kwargs()["num_hidden_layers"] == 6
    assert bt.config_kwargs(4)["num_hidden_layers"] == 2 and bt.config_kwargs(4)["vision_config"]["image_size"] == 288
    assert published_model("vilt").config_kwargs(4)["patch_size"] == 32
    assert set(PUBLISHED) == {"blip-vqa-base", "vilt-b32", "bridgetower-base"}
    with pytest.raises(ConfigError, match="unknown published model"):
        published_model("nope")
    with pytest.raises(ConfigError, match="layers"):
        published_model("vilt").config_kwargs(13)


def test_shared_copy_shares_tensors_not_modules():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    twin = shared_copy(model)
    assert twin is not model and twin[0] is not model[0]
    assert twin[0].weight is model[0].weight


def test_randomise_trimmers_scales_only_the_token_scorers_global_terms():
    from trimkit.passes.smarttrim import TokenTrimmer
    from trimkit.runtime import state

    def model():
        m = torch.nn.Module()
        setattr(m, state.TOKEN_TRIMMERS, torch.nn.ModuleDict({"a": TokenTrimmer(16, 8)}))
        m.other = torch.nn.Linear(4, 4)
        return m

    full, half, none = model(), model(), model()
    before = full.other.weight.clone()
    assert randomise_trimmers(full, 3) == randomise_trimmers(half, 3, 0.5) == randomise_trimmers(none, 3, 0.0) == 6
    tf, th, tn = (getattr(m, state.TOKEN_TRIMMERS)["a"] for m in (full, half, none))
    for name in ("glob", "cross"):
        assert torch.equal(getattr(th, name).weight, getattr(tf, name).weight * 0.5)
        assert not getattr(tn, name).weight.any() and getattr(tf, name).weight.std() > 0.1
    for name in ("local", "score"):  # the same draws, unscaled; biases zeroed
        assert torch.equal(getattr(th, name).weight, getattr(tf, name).weight)
        assert torch.equal(getattr(tn, name).weight, getattr(tf, name).weight)
        assert not getattr(tf, name).bias.any()
    assert torch.equal(full.other.weight, before)  # the model's own weights untouched


def test_centred_decisions_remove_the_row_level_and_rank_by_position():
    from trimkit.passes.smarttrim import TokenTrimmer

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": TokenTrimmer(16, 8), "b": TokenTrimmer(16, None)})
    x, g, o = torch.randn(3, 7, 16), torch.randn(3, 16), torch.randn(3, 8)
    before = model["a"](x, g, o)
    assert centre_token_logits(model, seed=5) == 2
    after, quick = model["a"](x, g, o), model["a"].fast_logits(x, g, o)
    offset = after - (before - before.mean(-1, keepdim=True))
    assert torch.allclose(offset, offset[:1].expand_as(offset), atol=1e-5)  # one offset per position, every row
    assert offset[0].std() > 0.3 and torch.allclose(quick, after, atol=1e-4)
    twin = torch.nn.ModuleDict({"a": TokenTrimmer(16, 8)})
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith("a.")})
    centre_token_logits(twin, seed=5)
    assert torch.allclose(twin["a"](x, g, o), after, atol=1e-5)  # the seed fixes the offsets
    with pytest.raises(ConfigError, match="positions"):
        centre_token_logits(twin, seed=5, positions=4) and twin["a"](x, g, o)
    with pytest.raises(ConfigError, match="decisions"):
        SpeedConfig(decisions="sorted", tiny=True)


def test_interleaved_times_rotates_and_counts():
    calls = []

    class M(torch.nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def forward(self, x):
            calls.append(self.tag)
            return x

    times = interleaved_times({"a": M("a"), "b": M("b"), "c": M("c")}, {"x": torch.zeros(1)}, 3)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_speed_run_writes_json_and_the_table_from_it(tmp_path):
    config = SpeedConfig(models=("vilt",), methods=("smarttrim", "random.tokens"), reductions=(2.0,),
                         batches=(1, 2), rounds=(1, 1), calib_rows=1, flops_rows=1, calib_iterations=4, tiny=True)
    run_dir = run_speed(config, tmp_path, command="trimkit bench --speed (test)")
    manifest, records = load_speed_run(run_dir)
    assert [r["method"] for r in records] == ["smarttrim", "random.tokens"]
    for r in records:
        assert r["status"] == "ok", r.get("error")
        assert r["flops"]["reduction"] == pytest.approx(r["flops"]["clean_per_sample"] / r["flops"]["trimmed_per_sample"])
        for b in (1, 2):
            lat = r["latency"][f"batch_{b}"]
            assert lat["speedup"] == pytest.approx(lat["clean"]["median_ms"] / lat["trimmed"]["median_ms"])
            assert lat["speedup_over_reduction"] == pytest.approx(lat["speedup"] / r["flops"]["reduction"])
    assert "padded_batch" in records[0]["flops"] and "threshold" in records[0]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{SPEED_START}\nSTALE-TABLE\n{SPEED_END}\nafter\n")
    top = tmp_path / "TOP.md"
    top.write_text(f"intro\n{SUMMARY_START}\nSTALE\n{SUMMARY_END}\n")
    report = build_speed_report(tmp_path, readme=readme, summary=top)
    brief = top.read_text()
    assert "STALE" not in brief and report["summary"] in brief
    rows = [line for line in brief.splitlines() if line.startswith("| vilt")]
    assert len(rows) == 1  # SmartTrim's row only; the baseline appears as a ratio range beside it
    lat, timed = records[0]["latency"]["batch_1"], timed_reduction(records[0], 1)
    base = records[1]["latency"]["batch_1"]["speedup"] / timed_reduction(records[1], 1)
    assert f"{lat['speedup']:.2f}x" in rows[0] and f"{lat['speedup'] / timed:.3f}" in rows[0]
    assert f"{base:.3f}-{base:.3f}" in rows[0]
    text = readme.read_text()
    assert "STALE-TABLE" not in text and text.startswith("intro") and text.rstrip().endswith("after")
    assert report["markdown"] in text and (tmp_path / "speed.md").read_text() == report["markdown"]
    smart = next(line for line in report["markdown"].splitlines() if "| smarttrim |" in line)
    assert f"{records[0]['flops']['reduction']:.2f}x" in smart
    assert f"{records[0]['latency']['batch_2']['speedup']:.2f}x" in smart
    # a failed variant is kept and listed, not dropped
    bad = json.loads((run_dir / manifest["files"][1]).read_text())
    bad.update(status="failed", error="ValueError: boom")
    (run_dir / manifest["files"][1]).write_text(json.dumps(bad))
    assert "failed" in build_speed_report(tmp_path)["markdown"] and "boom" in build_speed_report(tmp_path)["markdown"]

    # a later run of the same model at another depth adds rows; a later run at the same depth replaces them
    depth = records[0]["model"].get("layers")
    for name, layers in (("zz-deeper", (depth or 0) + 2), ("zz-same", depth)):
        copy = tmp_path / "runs" / name
        shutil.copytree(run_dir, copy)
        (copy / "manifest.json").write_text(json.dumps({**manifest, "run_id": name}))
        for f in manifest["files"]:
            rec = json.loads((copy / f).read_text())
            rec["model"]["layers"] = layers
            (copy / f).write_text(json.dumps(rec))
    chosen = {m["run_id"]: len(recs) for m, recs in newest_per_model(tmp_path)}
    assert chosen == {"zz-deeper": 2, "zz-same": 2}


def test_speed_cli_report_only_needs_a_run(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "--speed", "--report-only", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "no speed runs" in result.output


def test_timed_reduction_is_that_of_the_inputs_timed():
    from trimkit.bench.speed_report import timed_reduction

    rec = {"flops": {"reduction": 3.86, "per_row_reduction": [1.97, 5.7, 5.9, 5.3],
                     "padded_batch": {"batch": 32, "reduction": 1.42}}}
    assert timed_reduction(rec, 1) == 1.97 and timed_reduction(rec, 32) == 1.42
    assert timed_reduction(rec, 8) == 3.86  # that batch was not counted whole: the per-sample mean
    assert timed_reduction({"flops": {"reduction": 2.0}}, 1) == 2.0
