"""`trimkit bench`: the run plan, config hashes, the report, and a smoke run of the whole pipeline."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from trimkit.bench.report import END, START, aggregate, claims, markdown, update_readme
from trimkit.bench.run import (ABLATIONS, BASELINES, QUICK, SMOKE, BenchConfig, RunSpec, config_hash,
                               length_batches, plan)
from trimkit.cli import cli
from trimkit.errors import ConfigError


# ---------------------------------------------------------------------------------------- plan
def test_plan_full_bench_counts():
    config = BenchConfig(families=("blip",), tasks=("vqa",), seeds=3)
    runs = plan(config)
    smart = [r for r in runs if r.method == "smarttrim"]
    # 1.5x and 3x: one seed; 2x: three seeds
    assert sorted((round(r.ratio, 3), r.seed) for r in smart) == [(0.333, 0), (0.5, 0), (0.5, 1), (0.5, 2), (0.667, 0)]
    for name in BASELINES:
        assert sum(r.method == name for r in runs) == len(smart)
        assert sum(r.method == f"{name}+ft" for r in runs) == len(smart)
    for name in ABLATIONS:
        assert sorted(r.seed for r in runs if r.method == name) == [0, 1, 2]
        assert all(r.ratio == 0.5 for r in runs if r.method == name)
    assert [r.method for r in runs].count("full") == 1
    assert len({r.name for r in runs}) == len(runs)


def test_plan_baseline_follows_the_smarttrim_run_it_matches():
    runs = plan(BenchConfig(families=("vilt",), tasks=("vqa", "truefalse"), seeds=2))
    for i, run in enumerate(runs):
        if run.baseline:
            before = [r for r in runs[:i] if r.method == "smarttrim" and (r.task, r.ratio, r.seed) ==
                      (run.task, run.ratio, run.seed)]
            assert before, run.name


def test_plan_methods_filter_and_ablations_at_every_ratio():
    config = BenchConfig(families=("blip",), tasks=("vqa",), ratios=(0.5, 1 / 3), seeds=2, finetune=False,
                         ablations_all=True, methods=("full", "smarttrim", "smarttrim-tokens", "tome.merge"))
    runs = plan(config)
    assert {r.method for r in runs} == {"full", "smarttrim", "smarttrim-tokens", "tome.merge"}
    tokens = sorted((round(r.ratio, 3), r.seed) for r in runs if r.method == "smarttrim-tokens")
    assert tokens == [(0.333, 0), (0.5, 0), (0.5, 1)]  # extra seeds at 2x only, as for SmartTrim
    every = plan(replace(config, methods=()))
    assert {round(r.ratio, 3) for r in every if r.method == "smarttrim-heads"} == {0.5, 0.333}
    only_two_x = plan(replace(config, ablations_all=False, methods=()))
    assert {r.ratio for r in only_two_x if r.method in ABLATIONS} == {0.5}
    with pytest.raises(ConfigError, match="unknown bench methods"):
        replace(config, methods=("smarttrim", "magic"))


def test_quick_plan_is_reduced():
    runs = plan(QUICK)
    assert [r.method for r in runs] == ["full", "smarttrim", *BASELINES]
    assert {r.family for r in runs} == {"vilt"} and {r.task for r in runs} == {"vqa"}


@pytest.mark.parametrize("change, message", [
    (dict(families=("clip",)), "unknown bench families"),
    (dict(tasks=("retrieval",)), "unknown bench tasks"),
    (dict(ratios=(1.0,)), "ratios must be in (0, 1)"),
    (dict(seeds=0), "seeds must be a positive integer"),
    (dict(device="tpu"), "device must be 'cpu' or 'cuda'"),
    (dict(device="cuda:x"), "device must be 'cpu' or 'cuda'"),
    (dict(dtype="int8"), "dtype must be one of float32, bfloat16, float16"),
])
def test_config_errors(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        replace(BenchConfig(), **change)


def test_config_hash_tracks_what_decides_a_result():
    run = RunSpec("vilt", "vqa", "smarttrim", 0.5, 0)
    base = config_hash(SMOKE, run, "k")
    assert base == config_hash(SMOKE, run, "k")
    assert base == config_hash(replace(SMOKE, seeds=3, ablations=True), run, "k")  # the plan, not the run
    assert base == config_hash(replace(SMOKE, methods=("smarttrim",), ablations_all=True), run, "k")
    assert base != config_hash(replace(SMOKE, logit_penalty=0.01), run, "k")
    assert base != config_hash(replace(SMOKE, steps=SMOKE.steps + 1), run, "k")
    assert base != config_hash(SMOKE, replace(run, seed=1), "k")
    assert base != config_hash(SMOKE, run, "other-base")
    assert base == config_hash(replace(SMOKE, dtype="float32"), run, "k")  # the default: as before the option
    assert base != config_hash(replace(SMOKE, dtype="bfloat16"), run, "k")


# ---------------------------------------------------------------------------------------- report
def _record(method, ratio, seed, acc, flops, speed=(1.0, 1.0)):
    return {"family": "vilt", "task": "vqa", "method": method, "ratio": ratio, "seed": seed, "accuracy": acc,
            "flops": {"mean": flops, "p95": flops * 1.1}, "flops_reduction": 1e9 / flops,
            "latency_speedup": {"batch_1": speed[0], "batch_32": speed[1]}, "latency_batches": [1, 32]}


def _records(st3=0.885):
    return [_record("full", 1.0, 0, 0.90, 1e9),
            *[_record("smarttrim", 0.5, s, a, 5e8, (2.0, 1.6)) for s, a in enumerate((0.895, 0.893, 0.897))],
            _record("smarttrim", 1 / 3, 0, st3, 3.4e8, (1.0, 3.0)),
            _record("random.tokens", 1 / 3, 0, 0.70, 3.3e8), _record("tome.merge", 1 / 3, 0, 0.87, 3.3e8)]


def test_aggregate_mean_and_std_over_seeds():
    points = aggregate(_records())
    st = [p for p in points if p.method == "smarttrim" and p.ratio == 0.5][0]
    assert st.seeds == (0, 1, 2)
    assert math.isclose(st.accuracy, 0.895)
    assert math.isclose(st.accuracy_std, 0.002, rel_tol=1e-6)
    assert math.isclose(st.gflops, 0.5) and math.isclose(st.speedup_n, 1.6)
    assert points[0].method == "full"


def test_report_without_matplotlib_writes_the_table_and_says_why_there_is_no_plot(tmp_path, monkeypatch):
    import sys

    from trimkit.bench.report import build_report

    results = tmp_path / "results"
    results.mkdir()
    for i, record in enumerate(_records()):
        (results / f"run{i}.json").write_text(json.dumps({**record, "config_hash": str(i)}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib now fails
    report = build_report(results, docs=tmp_path / "docs", readme=tmp_path / "README.md")
    assert report["plots"] == []
    assert report["skipped"] == "plots skipped: matplotlib is not installed (pip install 'trimkit[plot]')"
    assert "| smarttrim | 2.0× |" in (tmp_path / "README.md").read_text()
    assert not (tmp_path / "docs").exists()


def test_claims_checks_drop_baselines_and_speed():
    (row,) = claims(aggregate(_records()))
    assert row["2x"]["ok"] and math.isclose(row["2x"]["drop"], 0.005, abs_tol=1e-9)
    assert row["2x"]["speed_ok"] is False  # 1.6 < 0.85 * 2
    assert row["3x"]["ok"] and row["3x"]["beats_training_free"]
    assert row["3x"]["speed_ok"] is False  # batch 1 is slower than the FLOPs say
    fast = [r if r["method"] != "smarttrim" or r["ratio"] != 0.5 else {**r, "latency_speedup": {"batch_1": 1.8, "batch_32": 1.75}}
            for r in _records()]
    assert claims(aggregate(fast))[0]["2x"]["speed_ok"] is True
    (worse,) = claims(aggregate(_records(st3=0.86)))
    assert not worse["3x"]["ok"] and not worse["3x"]["beats_training_free"]


def test_claims_allow_exactly_the_allowed_drop():
    # 0.535 - 0.525 is 0.010000000000000009 in floating point: a drop of exactly 1 point is allowed
    records = [_record("full", 1.0, 0, 0.535, 1e9), _record("smarttrim", 0.5, 0, 0.525, 5e8),
               _record("smarttrim", 1 / 3, 0, 0.515, 3.3e8)]
    (row,) = claims(aggregate(records))
    assert 0.535 - 0.525 > 0.01 and row["2x"]["ok"] and row["3x"]["ok"]
    (worse,) = claims(aggregate([*records[:1], _record("smarttrim", 0.5, 0, 0.524, 5e8)]))
    assert not worse["2x"]["ok"]


def test_claims_need_the_point_to_reach_its_target():
    short = [r if r["method"] != "smarttrim" or r["ratio"] > 0.4 else {**r, "flops": {"mean": 4.1e8, "p95": 4.5e8},
                                                                         "flops_reduction": 1e9 / 4.1e8}
             for r in _records()]
    points = aggregate(short)
    (row,) = claims(points)
    assert row["3x"]["drop"] <= 0.02 and row["3x"]["reached"] is False and row["3x"]["ok"] is False
    assert row["2x"]["reached"] and row["2x"]["ok"]
    assert "-1.50 pt vs full (NOT met: 2.44× is short of 3x)" in markdown(points)


def test_claims_of_a_smarttrim_variant_are_checked_on_their_own():
    records = [*_records(st3=0.80), _record("smarttrim-tokens", 1 / 3, 0, 0.89, 3.3e8, (1.0, 3.0))]
    points = aggregate(records)
    (main,) = claims(points)
    (tokens,) = claims(points, "smarttrim-tokens")
    assert main["method"] == "smarttrim" and not main["3x"]["ok"]
    assert tokens["method"] == "smarttrim-tokens" and tokens["3x"]["ok"] and tokens["3x"]["beats_training_free"]
    assert "2x" not in tokens
    text = markdown(points)
    assert "- vilt / vqa (smarttrim-tokens): 3x" in text and "- vilt / vqa: 2x" in text


def test_markdown_table_lists_every_point_with_the_command():
    text = markdown(aggregate(_records()), ["trimkit bench --quick"])
    assert "trimkit bench --quick" in text
    assert "| smarttrim | 2.0× | 3 | 89.50 ± 0.20 | -0.50 |" in text
    assert "| tome.merge | 3.0× | 1 | 87.00 | -3.00 |" in text
    assert "2x (2.00× fewer FLOPs): -0.50 pt vs full (ok), speed NOT met" in text


def test_update_readme_only_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n")
    update_readme(readme, "first")
    assert readme.read_text() == f"# title\n\nintro\n\n{START}\nfirst\n{END}\n"
    readme.write_text(readme.read_text() + "\nafter\n")
    update_readme(readme, "second")
    assert readme.read_text() == f"# title\n\nintro\n\n{START}\nsecond\n{END}\n\nafter\n"


# ---------------------------------------------------------------------------------------- smoke
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    args = ["bench", "--smoke", "--out", str(root / "results"), "--docs", str(root / "docs"),
            "--readme", str(root / "README.md"), "--cache-dir", str(root / "cache")]
    (root / "README.md").write_text("# project\n")
    first = CliRunner().invoke(cli, args)
    return root, args, first


@pytest.mark.slow
def test_smoke_writes_one_json_per_run(smoke):
    root, _, result = smoke
    assert result.exit_code == 0, result.output
    names = sorted(p.stem for p in (root / "results").glob("*.json"))
    assert names == sorted(r.name for r in plan(SMOKE))
    record = json.loads((root / "results" / "vilt-vqa-smarttrim-r0500-s0.json").read_text())
    env = record["environment"]
    assert {"torch", "transformers", "threads", "device", "git_revision"} <= set(env)
    assert env["threads"] == SMOKE.threads and env["device"] == "cpu"
    assert record["seeds"] == {"run": 0, "base": 0}
    assert record["command"].startswith("trimkit bench --smoke --out ")
    assert 0 < record["flops_ratio"] < 1 and record["items"] == 16 and record["metric"] == "accuracy"
    # fixed seeds: 2 of the 16 test items right; none of the validation items (settings are chosen
    # on the validation split, never on the test accuracy)
    assert record["accuracy"] == record["accuracy_untrimmed"] == 2 / 16
    assert record["val_accuracy"] == 0.0
    full = json.loads((root / "results" / "vilt-vqa-full-s0.json").read_text())
    for name in BASELINES:  # a training-free baseline with its trimmers off is the full model
        rec = json.loads((root / "results" / f"vilt-vqa-{name}-r0500-s0.json").read_text())
        assert rec["accuracy_untrimmed"] == full["accuracy"] and rec["items"] == full["items"]
    assert set(record["latency_ratio"]) == {"batch_1", f"batch_{SMOKE.latency_batch}"}
    assert record["train"]["threshold"] is not None


def test_smoke_baselines_match_smarttrim_flops(smoke):
    root = smoke[0]
    st = json.loads((root / "results" / "vilt-vqa-smarttrim-r0500-s0.json").read_text())
    for name in BASELINES:
        rec = json.loads((root / "results" / f"vilt-vqa-{name}-r0500-s0.json").read_text())
        assert rec["apply"]["flops_ratio_target"] == st["train"]["val_executed_ratio"]
        assert rec["flops_ratio"] < 1
        ft = json.loads((root / "results" / f"vilt-vqa-{name}+ft-r0500-s0.json").read_text())
        assert ft["train"]["steps"] == SMOKE.steps


@pytest.mark.slow
def test_a_baseline_run_alone_matches_the_smarttrim_result_on_file(smoke):
    root, args, _ = smoke
    st = json.loads((root / "results" / "vilt-vqa-smarttrim-r0500-s0.json").read_text())
    out = root / "alone"
    out.mkdir()
    (out / "vilt-vqa-smarttrim-r0500-s0.json").write_text(json.dumps(st))
    alone = [a for a in args if a != "--smoke"]
    alone[alone.index("--out") + 1] = str(out)
    result = CliRunner().invoke(cli, [*alone, "--smoke", "--methods", "random.tokens", "--no-report"])
    assert result.exit_code == 0, result.output
    rec = json.loads((out / "vilt-vqa-random.tokens-r0500-s0.json").read_text())
    assert rec["apply"]["flops_ratio_target"] == st["train"]["val_executed_ratio"] != 0.5
    other_base = {**st, "base": {**st["base"], "key": "another"}}
    (out / "vilt-vqa-smarttrim-r0500-s0.json").write_text(json.dumps(other_base))
    (out / "vilt-vqa-random.tokens-r0500-s0.json").unlink()
    result = CliRunner().invoke(cli, [*alone, "--smoke", "--methods", "random.tokens", "--no-report"])
    assert result.exit_code == 0, result.output
    rec = json.loads((out / "vilt-vqa-random.tokens-r0500-s0.json").read_text())
    assert rec["apply"]["flops_ratio_target"] == 0.5  # a SmartTrim point on another base does not count


def test_smoke_report_and_resume(smoke):
    root, args, _ = smoke
    text = (root / "README.md").read_text()
    assert text.startswith("# project\n") and START in text and END in text
    assert "| smarttrim | 2.0× |" in text
    assert (root / "docs" / "bench-vilt-vqa.png").stat().st_size > 1000
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("(done)") == len(plan(SMOKE))


def test_report_only_without_results_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "--report-only", "--out", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert result.output.strip().startswith("Error: no results folder")


def test_quick_and_smoke_exclude_each_other():
    result = CliRunner().invoke(cli, ["bench", "--quick", "--smoke"])
    assert result.exit_code == 1
    assert "--quick and --smoke exclude each other" in result.output


def test_claims_flag_baselines_whose_flops_do_not_match():
    records = _records() + [_record("topk.cls_attention", 1 / 3, 0, 0.80, 4.8e8)]
    (row,) = claims(aggregate(records))
    assert set(row["3x"]["unmatched"]) == {"topk.cls_attention"}
    assert "FLOPs not matched: topk.cls_attention at 2.08×" in markdown(aggregate(records))


def test_length_batches_have_one_length_and_follow_the_seed():
    lengths = [5, 7, 5, 5, 7, 9, 5, 7, 7, 5]
    batches = length_batches(lengths, 2, seed=0)
    assert all(len(b) == 2 and len({lengths[i] for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4, 6, 7, 8]  # 9 and the odd 5 left out
    assert length_batches(lengths, 2, seed=0) == batches
    assert any(length_batches(lengths, 2, seed=s) != batches for s in range(1, 5))
    with pytest.raises(ConfigError, match="no text length has 6 items"):
        length_batches(lengths, 6, seed=0)


def test_rows_name_their_code_revisions_when_runs_differ():
    def at(rev, records):
        return [{**r, "environment": {"git_revision": rev}} for r in records]

    same = markdown(aggregate(at("a" * 40, _records())))
    assert "git |" not in same
    mixed = at("a" * 40, _records()[:4]) + at("b" * 40, _records()[4:])
    text = markdown(aggregate(mixed))
    assert "| speedup b1 | speedup b32 | git |" in text
    assert "| smarttrim | 2.0× | 3 | 89.50 ± 0.20 | -0.50 |" in text and "| aaaaaaa |" in text
    assert text.count("| bbbbbbb |") == 3


def test_train_config_takes_the_bench_training_fields():
    from trimkit.bench.run import train_config

    config = replace(SMOKE, dual_lr=0.3, logit_penalty=0.1, logit_margin=2.0, undershoot=0.05, full_task=0.5,
                     freeze_backbone=True, lr_trimmer=0.02, beta=3.0)
    tc = train_config(config, RunSpec("vilt", "vqa", "smarttrim-nodistill", 0.5, 2))
    assert (tc.dual_lr, tc.logit_penalty, tc.logit_margin, tc.undershoot, tc.full_task) == (0.3, 0.1, 2.0, 0.05, 0.5)
    assert tc.freeze_backbone and (tc.lr_trimmer, tc.beta, tc.batch_size, tc.calibrate) == (0.02, 3.0, 8, 16)
    assert (tc.alpha, tc.seed, tc.measure_every) == (0.0, 2, 0)
    assert train_config(config, RunSpec("vilt", "vqa", "smarttrim", 0.5, 0)).alpha == config.alpha


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_missing_cuda_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "--smoke", "--device", "cuda", "--no-report",
                                      "--out", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "'cuda' is not available" in lines[0]
    assert "Traceback" not in result.output and not (tmp_path / "results").exists()


def _bench_in(tmp_path, *extra):
    args = ["bench", "--smoke", "--methods", "full,smarttrim,random.tokens+ft", "--no-report",
            "--out", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache"), *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return {p.stem: json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")}


@pytest.mark.slow
def test_smoke_in_bfloat16_trains_finetunes_and_evaluates(tmp_path):
    records = _bench_in(tmp_path, "--dtype", "bfloat16")
    assert sorted(records) == ["vilt-vqa-full-s0", "vilt-vqa-random.tokens+ft-r0500-s0", "vilt-vqa-smarttrim-r0500-s0"]
    for record in records.values():
        assert record["environment"]["dtype"] == "bfloat16" and record["environment"]["device"] == "cpu"
        assert 0 <= record["accuracy"] <= 1
    trained = records["vilt-vqa-smarttrim-r0500-s0"]
    assert 0 < trained["flops_ratio"] < 1 and trained["train"]["threshold"] is not None
    assert math.isfinite(records["vilt-vqa-random.tokens+ft-r0500-s0"]["train"]["loss_last"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smoke_on_cuda(tmp_path, dtype):
    records = _bench_in(tmp_path, "--device", "cuda", "--dtype", dtype)
    assert len(records) == 3
    assert all(r["environment"]["device"] == "cuda" and r["environment"]["dtype"] == dtype for r in records.values())
    assert 0 < records["vilt-vqa-smarttrim-r0500-s0"]["flops_ratio"] < 1
