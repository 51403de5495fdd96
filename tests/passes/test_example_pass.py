"""The one-file token pass of examples/norm_tokens.py: exact at threshold 0, fewer FLOPs when it trims."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from trimkit.backbones import load_backbone
from trimkit.passes import apply_, remove_
from trimkit.profile import count_flops
from trimkit.runtime import set_threshold, trim_stats

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "norm_tokens.py"


def _example():
    name = "trimkit_example_norm_tokens"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _logits(bb, inputs):
    torch.manual_seed(0)  # ViLT draws a patch permutation in every forward
    with torch.no_grad():
        return bb.task.logits(bb.model(**inputs))


def test_norm_tokens_example_is_exact_at_threshold_zero_and_saves_flops_when_trimming():
    example = _example()
    bb = load_backbone("vilt-vqa-tiny")
    inputs = bb.example_inputs(2)
    bb.model.eval()
    before = _logits(bb, inputs)
    torch.manual_seed(0)
    full = count_flops(bb.model, inputs).flops
    report = apply_(bb.model, [example.NormTokensConfig(threshold=0.0)], inputs=inputs, hints=bb.hints)
    assert report.results[0].report["trimmed_layers"] > 0
    assert (_logits(bb, inputs) - before).abs().max().item() <= 1e-5
    set_threshold(bb.model, 0.6)
    _logits(bb, inputs)
    kept = trim_stats(bb.model)["tokens"]
    assert any(s["kept"][-1] < s["length"] for s in kept.values())
    torch.manual_seed(0)
    assert count_flops(bb.model, inputs).flops < full
    remove_(bb.model)
    assert torch.equal(_logits(bb, inputs), before)


def test_readme_shows_the_example_file_verbatim():
    readme = (EXAMPLE.parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- example:start -->\n", 1)[1].split("<!-- example:end -->", 1)[0]
    assert block == "```python\n" + EXAMPLE.read_text(encoding="utf-8") + "```\n"
