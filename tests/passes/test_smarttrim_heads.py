"""smarttrim.heads on every family: exact at threshold 0, pruned heads not computed, batched == rows,
gradients in training, undo, saved folders, and composition with smarttrim.tokens."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from trimkit.attention import HeadSlice
from trimkit.backbones import load_backbone
from trimkit.errors import ConfigError
from trimkit.io import load_folder, save_folder
from trimkit.passes import apply_, remove_, smarttrim_heads
from trimkit.passes.smarttrim import SmartTrimTokensConfig, token_runtime
from trimkit.passes.smarttrim_heads import SmartTrimHeadsConfig, head_runtime
from trimkit.profile import count_flops
from trimkit.rows import batch_size_of, take_rows
from trimkit.runtime import trimming_off

ROOT = Path(__file__).resolve().parents[2]
HF = ["blip-vqa-tiny", "blip-itm-tiny", "bridgetower-itm-tiny", "vilt-vqa-tiny", "clip-tiny", "siglip-tiny",
      "llava-tiny", "qwen2-vl-tiny"]
TOYS = [str(ROOT / "tests/models/toy_vlms.py") + ":two_stream", str(ROOT / "tests/models/toy_vlms.py") + ":single_stream"]
ALL = HF + TOYS
# Qwen2-VL's vision tower runs on packed patches [L, D] with no batch dimension: its heads are not
# trimmed (a one-line skip); the language model's are.
PACKED_VISION = {"qwen2-vl-tiny": r"^model\.visual\."}


def _ids(ref: str) -> str:
    return ref.rsplit(":", 1)[-1] if ":" in ref else ref


def _setup(ref, batch=3):
    bb = load_backbone(ref)
    return bb, bb.example_inputs(batch)


def _out(bb, inputs):
    torch.manual_seed(0)  # ViLT samples image patches with the global generator
    with torch.no_grad():
        out = bb.model(**inputs)
    if bb.task.kind == "contrastive":  # rows of a contrastive batch are not independent
        return torch.cat([out.image_embeds, out.text_embeds], dim=-1)
    return bb.task.logits(out)


def _rows(bb, inputs):
    return torch.cat([_out(bb, take_rows(inputs, [i])) for i in range(batch_size_of(inputs))])


def _trimmers(model):
    return [t for t in model.trimkit_head_trimmers.values() if bool(t.active)]


def _randomise(model, scale=3.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    for t in _trimmers(model):
        with torch.no_grad():
            t.fc2.weight.copy_(torch.randn(t.fc2.weight.shape, generator=g) * scale)
            t.fc2.bias.zero_()


def _half(model):
    """Every row keeps the even heads (probability ~0.98) and drops the odd ones (~0.02)."""
    for t in _trimmers(model):
        with torch.no_grad():
            t.fc2.weight.zero_()
            h = t.fc2.bias.numel()
            t.fc2.bias.copy_(torch.tensor([4.0 if i % 2 == 0 else -4.0 for i in range(h)]))


def _apply(bb, inputs, *configs):
    """Head mechanics are tested on every site, a decoder's language model included (single forwards)."""
    configs = [dataclasses.replace(c, decoder_lm=True) if isinstance(c, SmartTrimHeadsConfig) else c for c in configs]
    return apply_(bb.model, configs, inputs=inputs, hints=bb.hints)


@pytest.mark.parametrize("ref", ALL, ids=_ids)
@pytest.mark.slow
def test_threshold_zero_is_exact_and_remove_restores(ref):
    bb, inputs = _setup(ref)
    expected = _out(bb, inputs)
    report = _apply(bb, inputs, SmartTrimHeadsConfig(threshold=0.0)).results[0].report
    _randomise(bb.model)
    assert report["trimmed_sites"], report
    skipped = {p: why for p, why in report["skipped_sites"].items()
               if not (ref in PACKED_VISION and re.match(PACKED_VISION[ref], p) and "no [B, L," in why)}
    assert skipped == {}, report["skipped_sites"]
    assert report["trimmer_params"] == sum(p.numel() for t in _trimmers(bb.model) for p in t.parameters())
    assert (_out(bb, inputs) - expected).abs().max().item() <= 1e-5
    stats = head_runtime(bb.model).stats()["heads"]
    assert set(stats) == set(report["trimmed_sites"]) and all(s["kept"] == s["heads"] for s in stats.values())
    remove_(bb.model)
    assert not hasattr(bb.model, "trimkit_head_trimmers") and head_runtime(bb.model) is None
    assert (_out(bb, inputs) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("ref", ALL, ids=_ids)
@pytest.mark.slow
def test_pruned_heads_are_not_computed(ref):
    bb, inputs = _setup(ref)
    report = _apply(bb, inputs, SmartTrimHeadsConfig(threshold=0.5)).results[0].report
    sites = report["trimmed_sites"]
    rt = head_runtime(bb.model)
    with trimming_off(bb.model):
        full = count_flops(bb.model, inputs, blocks={p: "attention" for p in sites})
    rt.threshold = 0.0
    assert count_flops(bb.model, inputs).flops <= full.flops * 1.01  # the trimmers themselves cost <= 1 %
    rt.threshold = 0.5
    _half(bb.model)
    half = count_flops(bb.model, inputs).flops
    # the q/k/v/o projections and the score/context products of a site scale with its heads
    pruned = {p: rt.plans[p].units // 2 / rt.plans[p].units for p in sites}
    bound = sum(pruned[p] * full.block(p).flops for p in sites)
    assert full.flops - half >= 0.9 * bound, (full.flops, half, bound)
    assert all(s["kept"] == s["heads"] - s["heads"] // 2 for s in rt.stats()["heads"].values())
    rt.threshold = 1.0
    harsh = count_flops(bb.model, inputs).flops
    assert all(s["kept"] == rt.plans[p].group for p, s in rt.stats()["heads"].items())
    assert half < full.flops
    if any(rt.plans[p].units > 2 for p in sites):
        assert harsh < half
    else:  # two heads per site: "half" already keeps only one
        assert harsh == half


@pytest.mark.parametrize("batched", ["union", "rows"])
@pytest.mark.parametrize("ref", ALL, ids=_ids)
@pytest.mark.slow
def test_rows_keeping_different_heads_match_rows_run_alone(ref, batched):
    bb, inputs = _setup(ref)
    _apply(bb, inputs, SmartTrimHeadsConfig(threshold=0.5, batched=batched))
    _randomise(bb.model)
    rt = head_runtime(bb.model)
    batched = _out(bb, inputs)
    masks = rt.cost_inputs()["heads"]
    assert any(not bool((m == m[:1]).all()) for m in masks.values()), "rows should keep different heads"
    assert any(bool((m == 0).any()) for m in masks.values())
    assert (_rows(bb, inputs) - batched).abs().max().item() <= 1e-4
    rt.reference = True  # the same decisions applied as masks on every head
    assert (_out(bb, inputs) - batched).abs().max().item() <= 1e-4


@pytest.mark.parametrize("ref", ALL, ids=_ids)
@pytest.mark.slow
def test_train_mode_masks_reach_every_trimmer(ref):
    bb, inputs = _setup(ref, batch=2)
    _apply(bb, inputs, SmartTrimHeadsConfig())
    model = bb.model.train()
    for t in _trimmers(model):  # keep about half, so masks matter
        with torch.no_grad():
            t.fc2.bias.zero_()
    torch.manual_seed(0)
    out = model(**inputs)
    logits = bb.task.logits(out) if bb.task.kind != "contrastive" else out.logits_per_image
    masks = head_runtime(model).cost_inputs()["heads"]
    assert masks and all(m.requires_grad and m.shape[1] >= 2 for m in masks.values())
    loss = logits.float().pow(2).mean() + 1e-3 * sum(m.sum() for m in masks.values())
    loss.backward()
    for t in _trimmers(model):
        for name, p in t.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("ref", ["vilt-vqa-tiny", TOYS[0]], ids=_ids)
def test_saved_folder_restores_the_same_outputs(ref, tmp_path):
    bb, inputs = _setup(ref, batch=2)
    _apply(bb, inputs, SmartTrimHeadsConfig(threshold=0.5))
    _randomise(bb.model)
    expected = _out(bb, inputs)
    assert head_runtime(bb.model).stats()["heads"]
    out = save_folder(tmp_path / "saved", base_ref=ref, model=bb.model)
    restored = load_folder(out)
    got = _out(restored, inputs)
    assert torch.equal(got, expected)
    assert head_runtime(restored.model).stats() == head_runtime(bb.model).stats()


@pytest.mark.parametrize("ref", ["blip-vqa-tiny", "vilt-vqa-tiny", "clip-tiny"] + TOYS, ids=_ids)
@pytest.mark.parametrize("order", ["tokens-heads", "heads-tokens"])
@pytest.mark.slow
def test_tokens_and_heads_compose(ref, order):
    bb, inputs = _setup(ref)
    expected = _out(bb, inputs)
    tok, heads = SmartTrimTokensConfig(threshold=0.0), SmartTrimHeadsConfig(threshold=0.0)
    results = _apply(bb, inputs, *((tok, heads) if order == "tokens-heads" else (heads, tok))).results
    token_report = results[0 if order == "tokens-heads" else 1].report
    assert (_out(bb, inputs) - expected).abs().max().item() <= 1e-5
    trt, hrt = token_runtime(bb.model), head_runtime(bb.model)
    g = torch.Generator().manual_seed(1)
    for t in bb.model.trimkit_token_trimmers.values():
        with torch.no_grad():
            t.score.weight.copy_(torch.randn(t.score.weight.shape, generator=g) * 3)
            t.score.bias.zero_()
    _randomise(bb.model)
    trt.threshold = hrt.threshold = 1.0
    both = count_flops(bb.model, inputs).flops
    hrt.enabled = False
    tokens_only = count_flops(bb.model, inputs).flops
    hrt.enabled, trt.enabled = True, False
    heads_only = count_flops(bb.model, inputs).flops
    trt.enabled = True
    assert both < tokens_only and both <= heads_only, (both, tokens_only, heads_only)
    if token_report["trimmed_streams"]:  # the token pass may leave a model whole (its report says why)
        assert both < heads_only, (both, heads_only)
    if ref == "clip-tiny":
        return
    trt.threshold = hrt.threshold = 0.5  # rows differ in tokens and heads: batched == one by one
    batched = _out(bb, inputs)
    assert (_rows(bb, inputs) - batched).abs().max().item() <= 1e-4


# BLIP's vision attention reshapes with ``embed_dim // num_heads`` of its input width and BridgeTower's
# vision tower is nn.MultiheadAttention: both need the TorchFunctionMode; every other site must not.
@pytest.mark.parametrize("ref, moded", [("vilt-vqa-tiny", ""), ("blip-vqa-tiny", r"^vision_model\."),
                                        ("bridgetower-itm-tiny", r"\.resblocks\.\d+\.attn$"),
                                        ("clip-tiny", ""), ("llava-tiny", "")], ids=_ids)
@pytest.mark.slow
def test_linear_layouts_are_chosen_and_run_without_a_torch_function_mode(ref, moded, monkeypatch):
    bb, inputs = _setup(ref)
    report = _apply(bb, inputs, SmartTrimHeadsConfig(threshold=0.5)).results[0].report
    sites = report["trimmed_sites"]
    fast = {p for p, layout in report["layouts"].items() if layout.startswith("linear")}
    assert fast and fast == {p for p in sites if not (moded and re.search(moded, p))}, report["layouts"]
    entered = []
    for_site = HeadSlice.for_site
    monkeypatch.setattr(HeadSlice, "for_site", lambda plan, d: (entered.append(plan.path), for_site(plan, d))[1])
    _randomise(bb.model)
    rt = head_runtime(bb.model)
    removed = _out(bb, inputs)
    pruned = {p for p, m in rt.cost_inputs()["heads"].items() if bool((m == 0).any())}
    assert pruned & fast and not set(entered) & fast
    assert set(entered) <= set(sites) - fast
    projections = [m for p in sites for m in rt.plans[p].linears]
    assert not any("forward" in vars(m) for m in projections)  # restored after each call
    rt.reference = True  # the same decisions as masks on every head
    assert (_out(bb, inputs) - removed).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_sliced_weights_are_cached_per_decision_and_follow_weight_updates():
    bb, inputs = _setup("vilt-vqa-tiny", batch=1)
    _apply(bb, inputs, SmartTrimHeadsConfig(threshold=0.5))
    _half(bb.model)
    rt = head_runtime(bb.model)
    path = next(iter(rt.plans))
    even = tuple(range(0, rt.plans[path].units, 2))
    first = _out(bb, inputs)
    entry = rt.forwards._cache[path][even]
    assert torch.equal(_out(bb, inputs), first) and rt.forwards._cache[path][even] is entry  # reused, not rebuilt
    query = rt.plans[path].in_mods[0][0]
    with torch.no_grad():
        query.weight.mul_(2.0)
    changed = _out(bb, inputs)
    assert not torch.equal(changed, first) and rt.forwards._cache[path][even] is not entry
    rt.cache_budget = 0.0
    assert torch.equal(_out(bb, inputs), changed)


# ----------------------------------------------------------------------------------------------
# Attention code the pass has to adapt to, or leave whole
# ----------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    """Reshapes with ``view(b, -1, num_heads, head_dim)``; optionally scales each head by a parameter."""

    def __init__(self, width: int, heads: int, head_scale: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = heads, width // heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, heads)) if head_scale else None

    def forward(self, x):
        b = x.shape[0]
        q, k, v = (p(x).view(b, -1, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-1, -2) * self.head_dim ** -0.5).softmax(dim=-1)
        ctx = attn @ v
        if self.scale is not None:
            ctx = ctx * self.scale[None, :, None, None]
        return self.o(ctx.transpose(1, 2).reshape(b, -1, self.num_heads * self.head_dim))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, head_scale: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = _Attention(width, heads, head_scale)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 32)
        self.blocks = nn.ModuleList([_Block(32, 4, False), _Block(32, 4, True), _Block(32, 4, False)])

    def forward(self, pixel_values):
        x = self.embed(pixel_values)
        for blk in self.blocks:
            x = blk(x)
        return x.mean(1)


def test_attribute_layout_is_chosen_and_unsliceable_sites_are_left_whole():
    torch.manual_seed(0)
    model = _Encoder().eval()
    inputs = {"pixel_values": torch.randn(3, 6, 12)}
    with torch.no_grad():
        expected = model(**inputs)
    report = apply_(model, SmartTrimHeadsConfig(threshold=0.5), inputs=inputs).results[0].report
    assert report["layouts"] == {"blocks.0.attn": "linear+attributes", "blocks.2.attn": "linear+attributes"}, report
    assert list(report["skipped_sites"]) == ["blocks.1.attn"]
    assert "RuntimeError" in report["skipped_sites"]["blocks.1.attn"]
    _randomise(model)
    rt = head_runtime(model)
    with torch.no_grad():
        batched = model(**inputs)
        rows = torch.cat([model(pixel_values=inputs["pixel_values"][i:i + 1]) for i in range(3)])
        assert (rows - batched).abs().max().item() <= 1e-5
        assert set(rt.stats()["heads"]) == {"blocks.0.attn", "blocks.2.attn"}
        assert model.blocks[0].attn.num_heads == 4  # attributes are restored after each call
        rt.threshold = 0.0
        assert (model(**inputs) - expected).abs().max().item() <= 1e-6
    # an inactive trimmer is not trainable and is kept in the state dict (restored without checks)
    from trimkit.passes.base import trainable_parameters
    inactive = model.trimkit_head_trimmers["blocks__1__attn"]
    assert not bool(inactive.active) and not set(map(id, inactive.parameters())) & set(map(id, trainable_parameters(model)))
    assert "trimkit_head_trimmers.blocks__1__attn.active" in model.state_dict()


@pytest.mark.parametrize("field, value", [("threshold", 1.5), ("target_ratio", 0.0), ("min_heads", 0),
                                          ("tau", 0.0), ("hidden", -1), ("sites", "(")])
def test_bad_config_values_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=field):
        SmartTrimHeadsConfig(**{field: value})


def test_sites_regex_and_min_heads():
    bb, inputs = _setup("blip-vqa-tiny")
    report = _apply(bb, inputs, SmartTrimHeadsConfig(sites=r"^text_encoder\.", min_heads=2)).results[0].report
    assert report["trimmed_sites"] and all(p.startswith("text_encoder.") for p in report["trimmed_sites"])
    rt = head_runtime(bb.model)
    rt.threshold = 1.0
    _out(bb, inputs)
    assert all(s["kept"] == 2 for s in rt.stats()["heads"].values())


def test_grouped_query_attention_is_trimmed_per_key_value_head():
    bb, inputs = _setup("llava-tiny")
    report = _apply(bb, inputs, SmartTrimHeadsConfig(threshold=0.5)).results[0].report
    rt = head_runtime(bb.model)
    grouped = [p for p in report["trimmed_sites"] if rt.plans[p].group > 1]
    assert grouped and all(p.startswith("model.language_model.") for p in grouped)
    _randomise(bb.model)
    _out(bb, inputs)
    for p in grouped:
        mask = rt.cost_inputs()["heads"][p]
        g = rt.plans[p].group
        assert mask.shape[1] == rt.plans[p].heads
        assert torch.equal(mask, mask[:, ::g].repeat_interleave(g, dim=1))  # the heads sharing keys go together


def test_int8_after_heads_leaves_the_sliced_projections_in_float():
    from trimkit.passes import Int8DynamicConfig, Int8DynamicLinear
    bb, inputs = _setup("vilt-vqa-tiny")
    heads = _apply(bb, inputs, SmartTrimHeadsConfig(threshold=0.5), Int8DynamicConfig()).results[0].report
    rt = head_runtime(bb.model)
    for path in heads["trimmed_sites"]:
        site = bb.model.get_submodule(path)
        assert type(site.attention.query) is nn.Linear and type(site.output.dense) is nn.Linear
    assert any(isinstance(m, Int8DynamicLinear) for m in bb.model.modules())
    _randomise(bb.model)
    removed = _out(bb, inputs)
    assert any(bool((m == 0).any()) for m in rt.cost_inputs()["heads"].values())
    rt.reference = True
    assert (_out(bb, inputs) - removed).abs().max().item() <= 1e-4
    rt.reference = False
    half = count_flops(bb.model, inputs).flops
    rt.threshold = 0.0
    assert half < count_flops(bb.model, inputs).flops
    remove_(bb.model)
    assert not any(hasattr(m, "trimkit_no_quant") for m in bb.model.modules())


def test_trimmer_inference_logits_match_its_forward():
    torch.manual_seed(0)
    trimmer = smarttrim_heads.HeadTrimmer(32, 4)
    nn.init.normal_(trimmer.fc2.weight, std=1.0)
    g = torch.randn(5, 32) * 3
    with torch.no_grad():
        fast, ref = trimmer.logits(g), trimmer(g)
    assert fast.shape == (5, 4) and (fast - ref).abs().max().item() <= 1e-5
    assert trimmer.logits(g).requires_grad  # with gradients it is the module's own forward
