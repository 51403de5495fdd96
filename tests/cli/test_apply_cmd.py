"""`trimkit apply`: the tree and profile it prints, the folder it writes, and its one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import trimkit
from trimkit.backbones import load_backbone
from trimkit.cli import cli
from trimkit.passes import apply_, parse_recipe

TOY = "tests/models/toy_vlms.py:two_stream"

RECIPE = """
[[pass]]
name = "smarttrim.tokens"
threshold = 1.0

[[pass]]
name = "int8.dynamic"
"""


def _run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.slow
@pytest.mark.parametrize("ref", [TOY, "vilt-vqa-tiny"])
def test_apply_saves_a_folder_that_load_restores(tmp_path, ref):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    torch.manual_seed(0)
    res = _run("apply", "--model", ref, "--recipe", str(recipe), "--out", str(out), "--samples", "2", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert [p["name"] for p in report["passes"]] == ["smarttrim.tokens", "int8.dynamic"]
    assert report["profile"]["speedup"]["flops"] > 1.3  # threshold 1.0 prunes what may be pruned
    # the same apply done in the library, same seed: identical outputs to the loaded folder
    torch.manual_seed(0)
    bb = load_backbone(ref)
    apply_(bb.model, parse_recipe(recipe), inputs=bb.example_inputs(2), hints=bb.hints)
    loaded = trimkit.load(out)
    inputs = bb.example_inputs(3, seed=5)
    torch.testing.assert_close(_outputs(loaded.model, inputs), _outputs(bb.model.eval(), inputs), rtol=0, atol=0)
    # and --model DIR works for the other commands
    res = _run("profile", "--model", str(out), "--samples", "1", "--json")
    assert res.exit_code == 0, res.output


@pytest.mark.slow
def test_apply_default_recipe_prints_tree(tmp_path):
    res = _run("apply", "--model", TOY, "--out", str(tmp_path / "o"), "--no-profile")
    assert res.exit_code == 0, res.output
    assert "smarttrim.tokens" in res.output and "trimmed_streams" in res.output
    assert "untrained" in res.output


@pytest.mark.parametrize("text,needle", [
    ('[[pass]]\nname = "no.such.pass"\n', "no.such.pass"),
    ('[[pass]]\nname = "smarttrim.tokens"\nthreshold = 3.0\n', "threshold"),
    ('[[pass]]\nname = "smarttrim.tokens"\nbogus = 1\n', "bogus"),
])
def test_bad_recipes_fail_with_one_line(tmp_path, text, needle):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    res = CliRunner().invoke(cli, ["apply", "--model", TOY, "--recipe", str(recipe), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_refuses_to_overwrite_without_flag(tmp_path):
    out = tmp_path / "o"
    assert _run("apply", "--model", TOY, "--out", str(out), "--no-profile").exit_code == 0
    res = CliRunner().invoke(cli, ["apply", "--model", TOY, "--out", str(out), "--no-profile"])
    assert res.exit_code == 1 and "--overwrite" in res.output
    assert _run("apply", "--model", TOY, "--out", str(out), "--no-profile", "--overwrite").exit_code == 0
