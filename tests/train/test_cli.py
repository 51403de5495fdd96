import json
import math

import pytest

from click.testing import CliRunner

from trimkit.cli import cli


@pytest.mark.slow
def test_train_then_eval_json(tokens_recipe, tmp_path):
    out = tmp_path / "trained"
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--model", "vilt-vqa-tiny", "--recipe", tokens_recipe, "--data",
                                 "synthetic:vqa?n=24", "--target-ratio", "0.7", "--steps", "3", "--batch-size", "8",
                                 "--measure-every", "0", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["target_ratio"] == 0.7
    assert (out / "trimkit.json").is_file() and (out / "checkpoints" / "step-000003").is_dir()
    result = runner.invoke(cli, ["eval", "--model", str(out), "--data", "synthetic:vqa?n=12", "--samples", "3",
                                 "--latency-batch", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["items"] == 12 and report["metric"]["name"] == report["metric_untrimmed"]["name"] == "accuracy"
    # fixed seeds: 1 of the 12 validation answers right with the trimmers on, 2 with them off
    assert report["metric"]["value"] == pytest.approx(1 / 12, abs=1e-12)
    assert report["metric_untrimmed"]["value"] == pytest.approx(2 / 12, abs=1e-12)
    assert set(report["flops"]) >= {"mean", "p50", "p95"}
    assert report["flops_ratio"] == report["flops"]["mean"] / report["flops_untrimmed"]["mean"]
    assert set(report["latency_ratio"]) == set(report["latency_ms"]) == {"batch_1", "batch_2"}
    for key, ratio in report["latency_ratio"].items():  # trimmed / untrimmed of the times it reports
        ms = report["latency_ms"][key]
        assert ratio == pytest.approx(ms["trimmed"] / ms["untrimmed"], rel=1e-12) and math.isfinite(ratio)
    assert "split=val" in report["data"]


def test_train_bad_target_ratio_is_one_line(tokens_recipe, tmp_path):
    result = CliRunner().invoke(cli, ["train", "--model", "vilt-vqa-tiny", "--recipe", tokens_recipe, "--data",
                                      "synthetic:vqa", "--target-ratio", "1.5", "--steps", "1", "--out",
                                      str(tmp_path / "x")])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: target ratio must be in (0, 1], got 1.5"


def test_eval_unknown_data_spec_is_one_line():
    result = CliRunner().invoke(cli, ["eval", "--model", "vilt-vqa-tiny", "--data", "synthetic:nope"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: unknown synthetic task 'nope'")
    assert len(result.output.strip().splitlines()) == 1


def _train_args(recipe, out, steps):
    return ["train", "--model", "vilt-vqa-tiny", "--recipe", recipe, "--data", "synthetic:vqa?n=24",
            "--target-ratio", "0.7", "--steps", str(steps), "--batch-size", "8", "--measure-every", "0",
            "--no-progress", "--out", str(out)]


def _steps_of(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.mark.slow
def test_train_never_replaces_a_trained_folder_without_overwrite(tokens_recipe, tmp_path):
    out = tmp_path / "trained"
    runner = CliRunner()
    assert runner.invoke(cli, _train_args(tokens_recipe, out, 2)).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    result = runner.invoke(cli, _train_args(tokens_recipe, out, 1))
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: --out {str(out)!r} already holds a saved model; add --overwrite to "
                                     "replace it or --resume to continue it (nothing was written)")
    assert (out / "model.safetensors").read_bytes() == before and _steps_of(out) == ["step-000002"]
    result = runner.invoke(cli, _train_args(tokens_recipe, out, 1) + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert _steps_of(out) == ["step-000001"]                        # the new run replaced the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.toml", "trained"]   # no staging folder left


@pytest.mark.slow
def test_train_refuses_a_foreign_folder_before_any_work(tokens_recipe, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(cli, _train_args(tokens_recipe, out, 1) + ["--overwrite"])
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: --out {str(out)!r} is not empty and is not a trimkit folder; "
                                     "choose another (nothing was written)")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_eval_table_has_no_nan_and_shows_speedups(monkeypatch):
    import rich.console

    from trimkit.cli.train_cmd import _print_eval

    console = rich.console.Console(record=True, width=200)
    monkeypatch.setattr(rich.console, "Console", lambda: console)
    _print_eval({"model": "m", "data": "d", "metric": {"name": "accuracy", "value": 0.5},
                 "metric_untrimmed": {"name": "accuracy", "value": 0.6},
                 "flops": {"mean": 1.0, "p50": 1.0, "p95": 4.0}, "flops_untrimmed": {"mean": 2.0, "p50": 3.0, "p95": 4.0},
                 "latency_ratio": {"batch_1": None, "batch_8": 0.8},
                 "latency_ms": {"batch_8": {"trimmed": 4.0, "untrimmed": 5.0}}})
    text = console.export_text()
    assert "nan" not in text
    speedups = [line.split("│")[-2].strip() for line in text.splitlines() if line.startswith(("│ FLOPs", "│ latency"))]
    assert speedups == ["2.000", "3.000", "1.000", "-", "1.250"]


def test_eval_progress_goes_to_stderr_as_plain_lines():
    args = ["eval", "--model", "vilt-vqa-tiny", "--data", "synthetic:vqa?n=6", "--samples", "2", "--batch-size", "4",
            "--no-latency"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    heads = [line.split("  ")[0].rsplit(" ", 1) for line in result.stderr.splitlines()]
    evaluating = [done for phase, done in heads if phase == "evaluating (trimmed, untrimmed)"]
    groups = len(evaluating) - 1  # one line per length bucket of the 6 items, after the opening one
    assert 2 <= groups <= 6 and evaluating == [f"{n}/{groups}" for n in range(groups + 1)]
    assert heads[groups + 1:] == [["counting FLOPs per sample", f"{n}/2"] for n in range(3)]
    assert "evaluating" not in result.stdout and "accuracy" in result.stdout
    quiet = CliRunner().invoke(cli, args + ["--json"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and json.loads(quiet.stdout)["items"] == 6
    assert CliRunner().invoke(cli, args + ["--no-progress"]).stderr == ""


@pytest.mark.slow
def test_train_progress_in_a_log_is_plain_lines(tokens_recipe, tmp_path):
    result = CliRunner().invoke(cli, ["train", "--model", "vilt-vqa-tiny", "--recipe", tokens_recipe, "--data",
                                      "synthetic:vqa?n=16", "--target-ratio", "0.7", "--steps", "2", "--batch-size",
                                      "4", "--measure-every", "0", "--out", str(tmp_path / "trained")])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split("  ")[0] for line in steps] == ["step 0/2", "step 1/2", "step 2/2"]
    assert " ratio " in steps[-1] and steps[-1].endswith(("it/s", "s/it"))
    calibration = [line.split("  ")[0] for line in lines if line.startswith("calibrating threshold")]
    assert calibration[0] == "calibrating threshold 0/17" and calibration[-1] == "calibrating threshold 17/17"
    assert "\r" not in result.stderr and "step 2/2" not in result.stdout


@pytest.mark.parametrize("model, name", [("blip-itm-tiny", "itm_accuracy"), ("clip-tiny", "in_batch_recall@1")])
def test_eval_names_the_retrieval_metric_by_what_it_computes(model, name):
    result = CliRunner().invoke(cli, ["eval", "--model", model, "--data", "synthetic:retrieval?n=4&image=32",
                                      "--samples", "1", "--no-latency", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["metric"]["name"] == report["metric_untrimmed"]["name"] == name
    # ITM scores a matched and a mismatched pair per item; recall ranks each of the 4 images' captions
    rows = 8 if name == "itm_accuracy" else 4
    assert report["items"] == rows
    assert (report["metric"]["value"] * rows) == pytest.approx(round(report["metric"]["value"] * rows), abs=1e-9)


def test_in_batch_recall_is_weighted_by_rows():
    from trimkit.evaluate import _row_weighted
    assert _row_weighted([(1.0, 3), (0.0, 1)]) == 0.75
