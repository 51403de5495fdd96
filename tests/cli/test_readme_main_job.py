"""The README's main job command, as written there, with only its sizes cut down; and the main job on
the shipped trained base (`MAIN_JOB`), cut down likewise."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from trimkit.cli import cli

README = Path(__file__).resolve().parents[2] / "README.md"
# Cut down: 20 training steps (3 leave the trimmers at about half accuracy), 64 items, latency at batch 4.
STEPS, AFTER_MIN = 20, 0.8
MAIN_JOB = ('trimkit apply --model vilt-vqa-where --data "synthetic:vqa?n=2000&objects=2-3&grid=3&jitter=0&questions=where" '
            '--target-ratio 0.5 --steps 200 --lr-backbone 1e-5 --batch-size 32 --out vilt-trimmed')


def _main_job() -> list[str]:
    section = README.read_text(encoding="utf-8").split("## Compress a model: the main job", 1)[1]
    command = re.search(r"^trimkit apply .*$", section, re.M).group(0)
    return shlex.split(command)[1:]


def test_readme_main_job_names_the_model_data_and_target():
    args = _main_job()
    assert args == shlex.split(MAIN_JOB)[1:]  # the command the slow test below runs, cut down
    assert args[0] == "apply"
    assert {"--model", "--data", "--target-ratio", "--steps", "--out"} <= set(args)


@pytest.mark.slow
def test_readme_main_job_runs_and_writes_a_loadable_folder(tmp_path):
    args = _main_job()
    args[args.index("--steps") + 1] = "3"
    data = args.index("--data") + 1
    args[data] = re.sub(r"n=\d+", "n=48", args[data])
    out = tmp_path / args[args.index("--out") + 1]
    args[args.index("--out") + 1] = str(out)
    result = CliRunner().invoke(cli, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "before / after" in result.output and f"saved to {out}" in result.output.replace("\n", "")
    import trimkit

    restored = trimkit.load(out)
    assert restored.model is not None and (out / "trimkit.json").is_file()


def _cut_down(args: list[str], steps: int, n: int, out: Path) -> list[str]:
    args = list(args)
    args[args.index("--steps") + 1] = str(steps)
    data = args.index("--data") + 1
    args[data] = re.sub(r"n=\d+", f"n={n}", args[data])
    args[args.index("--out") + 1] = str(out)
    return args


@pytest.mark.slow
def test_main_job_on_the_shipped_base_keeps_its_accuracy_and_halves_flops(tmp_path):
    import json

    args = _cut_down(shlex.split(MAIN_JOB)[1:], steps=STEPS, n=64, out=tmp_path / "vilt-trimmed")
    args[args.index("--batch-size") + 1] = "4"
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])["eval"]
    assert report["items"] == 64 and "questions=where" in report["data"]
    assert report["metric_untrimmed"]["value"] >= 0.8  # the shipped base, loaded by its registry name
    assert report["metric"]["value"] >= AFTER_MIN
    assert report["flops_ratio"] <= 0.7
