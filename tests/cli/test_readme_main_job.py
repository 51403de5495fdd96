"""The README's main job command, as written there, with only its sizes cut down."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from trimkit.cli import cli

README = Path(__file__).resolve().parents[2] / "README.md"


def _main_job() -> list[str]:
    section = README.read_text(encoding="utf-8").split("## Compress a model: the main job", 1)[1]
    command = re.search(r"^trimkit apply .*$", section, re.M).group(0)
    return shlex.split(command)[1:]


def test_readme_main_job_names_the_model_data_and_target():
    args = _main_job()
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
