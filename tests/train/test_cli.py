import json

from click.testing import CliRunner

from trimkit.cli import cli


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
    assert report["metric"]["name"] == "accuracy" and 0.0 <= report["metric"]["value"] <= 1.0
    assert set(report["flops"]) >= {"mean", "p50", "p95"}
    assert report["flops_ratio"] == report["flops"]["mean"] / report["flops_untrimmed"]["mean"]
    assert set(report["latency_ratio"]) == {"batch_1", "batch_2"}
    assert all(v > 0 for v in report["latency_ratio"].values())
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
