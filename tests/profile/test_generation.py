"""`profile_generation` / `trimkit profile --generate`: prefill vs decode FLOPs, KV-cache bytes, TTFT."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import DynamicCache

from toy_decoder import ToyKVCache, toy_decoder_factory
from trimkit.backbones import load_backbone
from trimkit.cli import cli
from trimkit.errors import ConfigError
from trimkit.profile import cache_bytes, compare_generation, count_flops, profile_generation
from trimkit.rows import take_rows

TOY = str(Path(__file__).parents[1] / "models" / "toy_decoder.py") + ":toy_decoder_factory"


def _kv_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, itemsize: int = 4) -> int:
    return 2 * layers * kv_heads * head_dim * tokens * itemsize


def test_cache_bytes_counts_each_storage_once_in_any_container():
    k = torch.zeros(1, 2, 5, 4)
    assert cache_bytes((k, k[:, :, :2])) == k.nbytes  # a view of a held tensor costs nothing more
    assert cache_bytes({"a": [k], "b": (torch.zeros(3, dtype=torch.float16),)}) == k.nbytes + 6
    toy = ToyKVCache()
    toy.update(k, k.clone(), 0)
    assert cache_bytes(toy) == 2 * k.nbytes
    hf = DynamicCache()
    hf.update(k, k.clone(), 0)
    hf.update(k.clone(), k.clone(), 1)
    assert cache_bytes(hf) == 4 * k.nbytes
    assert cache_bytes(None) == 0 and cache_bytes(torch.nn.Linear(3, 3)) == 0  # modules are not entered


@pytest.mark.slow
def test_toy_prefill_and_decode_flops_match_counted_forwards():
    model, inputs = toy_decoder_factory()
    row = take_rows(inputs, [0])
    cfg = model.cfg
    got = profile_generation(model, row, 3, repeats=1, warmup=0)
    assert got.forward_calls == 3 and got.batch_size == 1 and got.new_tokens == 3
    assert got.prefill_flops == count_flops(model, row).flops
    with torch.no_grad():  # the two decode steps, counted one by one
        out = model(**row, use_cache=True)
        ids, mask, steps = row["input_ids"], row["attention_mask"], []
        for _ in range(2):
            token = out.logits[:, -1:].argmax(-1)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
            step = {"input_ids": token, "attention_mask": mask, "use_cache": True}
            steps.append(count_flops(model, {**step, "past_key_values": copy.deepcopy(out.past_key_values)}).flops)
            out = model(**step, past_key_values=out.past_key_values)
    assert got.decode_flops_per_token == sum(steps) / 2
    prompt = row["input_ids"].shape[1]
    head_dim = cfg.width // cfg.heads
    assert got.kv_cache_bytes == {"prefill": _kv_bytes(cfg.layers, cfg.kv_heads, head_dim, prompt),
                                  "final": _kv_bytes(cfg.layers, cfg.kv_heads, head_dim, prompt + 2)}
    assert got.ttft_ms > 0 and got.per_token_ms > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llava-tiny", "qwen2-vl-tiny"])
def test_hf_generate_splits_prefill_and_decode(name):
    bb = load_backbone(name)
    inputs = bb.example_inputs(1)
    got = profile_generation(bb.model, inputs, 3, repeats=1, warmup=0)
    text = bb.model.config.text_config
    prompt, head_dim = inputs["input_ids"].shape[1], text.hidden_size // text.num_attention_heads
    assert got.forward_calls == 3 and got.prompt_tokens == prompt
    # generate encodes the image and runs the prompt, computing logits of the last position only
    assert got.prefill_flops == count_flops(bb.model, {**inputs, "logits_to_keep": 1}).flops
    assert 0 < got.decode_flops_per_token < got.prefill_flops / 10
    layers, kv = text.num_hidden_layers, text.num_key_value_heads
    assert got.kv_cache_bytes == {"prefill": _kv_bytes(layers, kv, head_dim, prompt),
                                  "final": _kv_bytes(layers, kv, head_dim, prompt + 2)}


def test_same_model_before_and_after_has_unit_flop_ratios():
    model, inputs = toy_decoder_factory()
    row = take_rows(inputs, [1])
    report = compare_generation(model, copy.deepcopy(model), row, 2, repeats=1, warmup=0)
    assert report["before"]["prefill_flops"] == report["after"]["prefill_flops"]
    speed = report["speedup"]
    assert speed["prefill_flops"] == speed["decode_flops_per_token"] == speed["kv_cache_bytes"] == 1.0
    assert speed["ttft"] > 0 and speed["per_token"] > 0


def test_models_without_generate_are_config_errors():
    with pytest.raises(ConfigError, match="no generate method"):
        profile_generation(torch.nn.Linear(2, 2), {"input": torch.zeros(1, 2)}, 2)
    model, inputs = toy_decoder_factory()
    with pytest.raises(ConfigError, match="at least 1"):
        profile_generation(model, inputs, 0)


@pytest.mark.slow
def test_cli_generate_json_and_text():
    runner = CliRunner()
    res = runner.invoke(cli, ["profile", "--model", TOY, "--generate", "2", "--samples", "1", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"flops", "params", "latency_ms"} <= set(report)  # the profile contract is kept
    gen = report["generate"]
    assert gen["new_tokens"] == 2 and gen["forward_calls"] == 2 and gen["batch_size"] == 1
    assert gen["kv_cache_bytes"]["final"] > gen["kv_cache_bytes"]["prefill"] > 0
    res = runner.invoke(cli, ["profile", "--model", TOY, "--generate", "2", "--samples", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "greedy generation of 2 tokens" in res.output and "time to first token" in res.output
    bad = runner.invoke(cli, ["profile", "--model", "clip-tiny", "--generate", "2", "--samples", "1",
                              "--no-progress"])
    assert bad.exit_code == 1 and bad.output.startswith("Error:") and "no generate method" in bad.output
    assert "Traceback" not in bad.output
