"""`trimkit apply --data` and `trimkit eval` on a decoder VLM: trained on text answers, scored by exact match."""
import json

import pytest
from click.testing import CliRunner

from trimkit.cli import cli


@pytest.mark.slow
def test_apply_trains_llava_tiny_on_text_answers_and_eval_reads_the_folder(tmp_path):
    out = tmp_path / "llava"
    res = CliRunner().invoke(cli, ["apply", "--model", "llava-tiny", "--data", "synthetic:vqa?n=16",
                                   "--target-ratio", "0.5", "--steps", "3", "--lr-backbone", "1e-3", "--samples", "2",
                                   "--batch-size", "2",
                                   "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output.strip().splitlines()[-1])
    assert [p["name"] for p in report["passes"]] == ["smarttrim.tokens"]
    ev = report["eval"]
    assert ev["metric"]["name"] == "exact_match" and 0.0 <= ev["metric"]["value"] <= 1.0
    assert ev["items"] == 16 and ev["flops_samples"] == 2
    assert ev["flops"]["mean"] <= ev["flops_untrimmed"]["mean"]
    assert set(ev["latency_ratio"]) == {"batch_1", "batch_2"}
    train = json.loads((out / "trimkit.json").read_text())["extra"]["train"]
    binding = train["binding"]
    assert train["config"]["lr_backbone"] == 1e-3
    assert binding["generative"]["eos_id"] == 2 and len(binding["generative"]["prefix"]) == 17
    res = CliRunner().invoke(cli, ["eval", "--model", str(out), "--data", "synthetic:vqa?n=4", "--samples", "2",
                                   "--no-latency", "--json"])
    assert res.exit_code == 0, res.output
    again = json.loads(res.output.strip().splitlines()[-1])
    assert again["metric"]["name"] == "exact_match" and again["items"] == 4
