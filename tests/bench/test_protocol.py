"""Frozen protocols: parsing, the run plan, runs recorded with the protocol's digest, failures kept,
and the report's intervals and verdicts."""
import json
from dataclasses import replace

import pytest

from trimkit.bench.protocol import ProtocolRun, load_protocol, plan
from trimkit.bench.protocol_report import MARKERS, build_protocol_report, models_in
from trimkit.bench.protocol_run import MANIFEST, _claim, run_protocol
from trimkit.errors import ConfigError

TEXT = """
name = "tiny"
models = ["{model}"]
data = "synthetic:vqa?image=48&objects=2-3&grid=3&jitter=0&questions=where"
verify = 2
prior_items = 200

[splits]
train = {{ n = 32, seed = 0 }}
val = {{ n = 16, seed = 0 }}
test = {{ n = 24, seed = 9 }}

[smarttrim]
ratios = [0.5]
seeds = 2
steps = 2
batch_size = 8
measure_every = 0

[baselines]
methods = ["topk.cls_attention"]
finetune_ratios = [0.5]

[controls]
full_finetune_seeds = 1

[margins]
"0.5" = 1.0
"""


def _write(tmp_path, model="vilt-vqa-where", text=TEXT):
    path = tmp_path / "p.toml"
    path.write_text(text.format(model=model), encoding="utf-8")
    return path


def test_protocol_parses_and_plans_baselines_after_their_smarttrim_run(tmp_path):
    protocol = load_protocol(_write(tmp_path))
    assert protocol.spec("test").endswith("questions=where&n=24&seed=9&split=test")
    assert protocol.train == {"batch_size": 8, "measure_every": 0} and protocol.margin(0.5) == 1.0
    names = [r.name for r in plan(protocol)]
    assert names[:3] == ["vilt-vqa-where-prior-s0", "vilt-vqa-where-full-s0", "vilt-vqa-where-smarttrim-r0500-s0"]
    assert names.index("vilt-vqa-where-topk.cls_attention-r0500-s0") > 2
    assert {"vilt-vqa-where-smarttrim-r0500-s1", "vilt-vqa-where-full+ft-s0",
            "vilt-vqa-where-topk.cls_attention+ft-r0500-s0"} <= set(names) and len(names) == 7
    assert ProtocolRun("m", "tome.merge+ft", 0.3333).baseline == "tome.merge"
    assert protocol.finetune_lr == 1e-4  # TrainConfig's lr_backbone unless [baselines] finetune_lr
    frozen = load_protocol(_write(tmp_path, text=TEXT.replace("measure_every = 0", "measure_every = 0\nfreeze_backbone = true")
                                  .replace("full_finetune_seeds = 1", "full_finetune_seeds = 0")
                                  .replace("finetune_ratios = [0.5]", "finetune_ratios = [0.5]\nfinetune_lr = 1e-5")))
    assert frozen.finetune_lr == 1e-5 and not [r for r in plan(frozen) if r.method == "full+ft"]


@pytest.mark.parametrize("change, message", [
    (("ratios = [0.5]", "ratios = [1.5]"), "ratios must be in"),
    (('"0.5" = 1.0', '"0.25" = 1.0'), "no margin for ratio 0.5"),
    (("steps = 2", "steps = 2\nlr_bogus = 1"), "unknown training settings"),
    (("batch_size = 8", "batch_size = 0"), "batch_size"),
    (('methods = ["topk.cls_attention"]', 'methods = ["magic"]'), "unknown methods"),
    (('name = "tiny"', ''), "missing 'name'"),
    (("measure_every = 0", "measure_every = 0\nfreeze_backbone = true"), "its own fine-tuning control"),
    (("[splits]", "[splits"), "not valid TOML"),
])
def test_bad_protocols_fail_with_one_line(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_protocol(_write(tmp_path, text=TEXT.replace(*change)))


def test_a_lock_of_a_dead_process_is_taken_over(tmp_path):
    lock = tmp_path / "run.lock"
    lock.write_text("999999999")
    assert _claim(lock) and not _claim(lock)


def test_failed_runs_are_kept_and_waiting_runs_stop(tmp_path):
    protocol = load_protocol(_write(tmp_path, model="no-such-model"))
    out = tmp_path / "out"
    lines = []
    run_protocol(protocol, out, log=lines.append)
    failed = sorted(out.glob("*.failed-*.json"))
    assert failed and all(json.loads(p.read_text())["status"] == "failed" for p in failed)
    assert (out / "no-such-model-prior-s0.json").exists()  # the prior needs no model
    assert any("cannot run" in line for line in lines)
    manifest = json.loads((out / MANIFEST).read_text())
    assert {r["status"] for r in manifest["runs"]} == {"ok", "failed"}
    report = build_protocol_report(protocol, out, readme=None)
    assert "no finished full-model run" in report["markdown"]
    run_protocol(replace(protocol, models=("another-model",)), out, log=lines.append)  # --families
    assert models_in(protocol, out) == ("no-such-model", "another-model")
    assert "`another-model`: no finished" in build_protocol_report(protocol, out, readme=None)["markdown"]


@pytest.mark.slow
def test_protocol_runs_end_to_end_and_reports_verdicts(tmp_path):
    protocol = load_protocol(_write(tmp_path))
    out = tmp_path / "out"
    paths = run_protocol(protocol, out, log=lambda line: None)
    assert len(paths) == 7
    runs = [json.loads(p.read_text()) for p in paths]
    assert all(r["status"] == "ok" and r["protocol"]["digest"] == protocol.digest for r in runs)
    smart = next(r for r in runs if r["method"] == "smarttrim")
    assert smart["test"]["items"] == 24 and smart["test"]["flops_verified"] == 2
    assert smart["test"]["flops"]["mean"] < smart["test"]["flops_untrimmed"]["mean"]
    topk = next(r for r in runs if r["method"] == "topk.cls_attention")
    assert topk["apply"]["flops_ratio_target"] == pytest.approx(
        json.loads((out / "vilt-vqa-where-smarttrim-r0500-s0.json").read_text())["val"]["flops_ratio"])
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{MARKERS[0]}\nold\n{MARKERS[1]}\nbottom\n", encoding="utf-8")
    report = build_protocol_report(protocol, out, readme=readme)
    assert report["verdicts"]["vilt-vqa-where"][0.5]["verdict"] in ("non-inferior", "inconclusive", "inferior")
    assert report["verdicts"]["vilt-vqa-where"][0.5]["seeds"] == 2 and report["verdicts"]["vilt-vqa-where"][0.5]["complete"]
    text = readme.read_text()
    assert "old" not in text and "SmartTrim 2x | 2 |" in text and text.startswith("top") and "topk.cls_attention+ft" in text
    before = {p: p.stat().st_mtime_ns for p in paths}
    run_protocol(protocol, out, log=lambda line: None)  # finished runs are not redone
    assert {p: p.stat().st_mtime_ns for p in paths} == before
    (tmp_path / "p.toml").write_text(TEXT.format(model="vilt-vqa-where").replace("verify = 2", "verify = 3"))
    changed = load_protocol(tmp_path / "p.toml")
    assert changed.digest != protocol.digest
    assert "0 of 7 runs finished" in build_protocol_report(changed, out, readme=None)["markdown"]


def test_cli_runs_a_subset_of_methods_on_another_model(tmp_path):
    from click.testing import CliRunner

    from trimkit.cli import cli as main

    path, out, readme = _write(tmp_path), tmp_path / "out", tmp_path / "R.md"
    readme.write_text(f"{MARKERS[0]}\n{MARKERS[1]}\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["bench", "--protocol", str(path), "--families", "other-model", "--methods", "prior",
                                       "--out", str(out), "--readme", str(readme)])
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.glob("*-s0.json")] == ["other-model-prior-s0.json"]
    assert "`other-model`: no finished full-model run" in readme.read_text()
    bad = CliRunner().invoke(main, ["bench", "--protocol", str(tmp_path / "missing.toml")])
    assert bad.exit_code != 0 and "cannot read protocol" in bad.output and "Traceback" not in bad.output
