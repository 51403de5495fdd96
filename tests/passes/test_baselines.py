"""random.tokens, topk.cls_attention and tome.merge: exact when off, schedules, FLOPs calibration, merging."""
from __future__ import annotations

import pytest
import torch

from trimkit.attention import AttentionMode, CaptureProbs
from trimkit.backbones import load_backbone
from trimkit.errors import ConfigError
from trimkit.io import load_folder, save_folder
from trimkit.passes import apply_, config_from_dict, config_to_dict, remove_, tome
from trimkit.passes.baselines import baseline_runtime, keep_counts, schedule_points
from trimkit.passes.random_tokens import RandomTokensConfig
from trimkit.passes.tome import ToMeMergeConfig, bipartite_merge
from trimkit.passes.topk import TopKClsAttentionConfig
from trimkit.profile import count_flops
from trimkit.runtime import set_threshold, trim_stats, trimming_off

TOYS = ["tests/models/toy_vlms.py:two_stream", "tests/models/toy_vlms.py:single_stream"]
HF = ["blip-vqa-tiny", "blip-itm-tiny", "vilt-vqa-tiny", "bridgetower-itm-tiny", "clip-tiny"]
CONFIGS = {"random": RandomTokensConfig, "topk": TopKClsAttentionConfig, "tome": ToMeMergeConfig}


def _setup(ref, batch=3):
    bb = load_backbone(ref)
    return bb, bb.example_inputs(batch)


def _out(bb, inputs):
    with torch.no_grad():
        out = bb.model(**inputs)
    if bb.task.kind == "contrastive":  # rows of a contrastive batch are not independent
        return torch.cat([out.image_embeds, out.text_embeds], dim=-1)
    return bb.task.logits(out)


def _apply(bb, inputs, config):
    return apply_(bb.model, [config], inputs=inputs, hints=bb.hints).results[0].report


def _specials(rt, stream, length):
    return rt.decider.special_positions(stream, length)


def _kept_positions(st):
    """Original positions a stream still computes after the last forward, ``[B, kept]`` ascending
    (removal: the gathered index; skip mode: the alive tokens of the full-length sequence)."""
    if st.index is not None:
        return st.index
    return torch.stack([row.nonzero()[:, 0] for row in st.alive])


def _rows(bb, inputs):
    n = inputs[next(iter(inputs))].shape[0]
    return torch.cat([_out(bb, {k: (v[i:i + 1] if torch.is_tensor(v) and v.dim() else v) for k, v in inputs.items()})
                      for i in range(n)])


# ----------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------
def test_keep_counts_and_schedule_points():
    assert keep_counts(16, 0.5, 3) == [8, 4, 2]
    assert keep_counts(16, 1.0, 2) == [16, 16]
    assert keep_counts(5, 0.01, 2) == [1, 1]  # at least one prunable token
    assert keep_counts(0, 0.5, 2) == [0, 0]
    points = schedule_points({"a": (16, 2), "b": (6, 1)})
    assert points == sorted(points) and all(0 < p < 1 for p in points)
    # between consecutive points the schedule does not move; across each point it does
    mids = [(a + b) / 2 for a, b in zip([0.0] + points, points + [1.0])]
    schedules = [(tuple(keep_counts(16, r, 2)), tuple(keep_counts(6, r, 1))) for r in mids]
    assert len(set(schedules)) == len(schedules)
    for p in points:
        assert (keep_counts(16, p * 0.999, 2), keep_counts(6, p * 0.999, 1)) != \
               (keep_counts(16, p * 1.001, 2), keep_counts(6, p * 1.001, 1))


def test_bipartite_merge_is_a_size_weighted_average():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 4, generator=g)
    size = torch.rand(2, 9, generator=g) + 0.5
    prunable = torch.ones(2, 9, dtype=torch.bool)
    prunable[:, 0] = False
    merged, new_size, keep = bipartite_merge(x, size, prunable, 3)
    assert keep.sum(1).tolist() == [6, 6] and keep[:, 0].all()
    assert torch.allclose(new_size.masked_select(keep).view(2, -1).sum(1), size.sum(1))
    assert torch.equal(merged[:, 0], x[:, 0])
    for row in range(2):
        for t in range(9):
            if not keep[row, t]:
                continue
            # who merged into t: dropped tokens whose mass went to t
            absorbed = new_size[row, t] - size[row, t]
            if absorbed.abs() < 1e-6:
                assert torch.equal(merged[row, t], x[row, t])
    # the total "mass" (size-weighted sum of states) is conserved among survivors
    before = (x * size[..., None]).sum(1)
    after = (merged * new_size[..., None] * keep[..., None]).sum(1)
    assert torch.allclose(before, after, atol=1e-5)
    with pytest.raises(ValueError, match="cannot merge"):
        bipartite_merge(x, size, prunable, 5)


def test_bipartite_merge_keeps_groups_apart():
    x = torch.randn(1, 8, 3)
    prunable = torch.ones(1, 8, dtype=torch.bool)
    group = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]]).bool()
    _, new_size, keep = bipartite_merge(x, torch.ones(1, 8), prunable, 2, group=group)
    # each group has 2 A and 2 B tokens: 2 merges stay inside a group
    for members in (slice(0, 4), slice(4, 8)):
        assert new_size[0, members][keep[0, members]].sum() == 4


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", list(CONFIGS.values()))
def test_config_round_trip_and_validation(cls):
    config = cls(keep_ratio=0.3, flops_ratio=0.6, start_layer=2, streams="vision", threshold=0.25)
    assert config_from_dict(config_to_dict(config)) == config
    for bad in ({"keep_ratio": 0.0}, {"keep_ratio": 1.5}, {"flops_ratio": -0.1}, {"threshold": 2.0},
                {"start_layer": -1}, {"streams": "("}):
        field = next(iter(bad))
        with pytest.raises(ConfigError, match=field):
            cls(**bad)
    with pytest.raises(ConfigError, match="start_layer"):
        TopKClsAttentionConfig(start_layer=0)


# ----------------------------------------------------------------------------------------------
# Every family: off is exact; on follows the schedule; remove_ restores
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("ref", HF + TOYS)
@pytest.mark.slow
def test_off_is_exact_schedule_is_followed_and_remove_restores(ref, method):
    bb, inputs = _setup(ref)
    ref_out = _out(bb, inputs)
    report = _apply(bb, inputs, CONFIGS[method](threshold=0.0))
    assert report["trimmed_streams"], report
    assert (_out(bb, inputs) - ref_out).abs().max().item() <= 1e-5
    rt = baseline_runtime(bb.model)
    set_threshold(bb.model, 0.5)
    trimmed = _out(bb, inputs)
    assert (trimmed - ref_out).abs().max().item() > 1e-5
    stats = trim_stats(bb.model)["tokens"]
    for stream in report["trimmed_streams"]:
        st = rt.state.streams[stream]
        specials = _specials(rt, stream, st.length)
        layers = sum(1 for p in rt.layers if rt.stream_of[p] == stream)
        expected = [len(specials) + k for k in keep_counts(st.length - len(specials), 0.5, layers)]
        assert stats[stream]["kept"] == [float(k) for k in expected], (stream, stats[stream])
        assert expected[-1] < st.length
        index = _kept_positions(st)
        assert index.shape == (inputs[next(iter(inputs))].shape[0], expected[-1])
        assert (index[:, 1:] > index[:, :-1]).all(), "kept tokens keep their order"
        for p in specials:
            assert (index == p).any(1).all(), f"special token {p} dropped"
    with trimming_off(bb.model):
        assert (_out(bb, inputs) - ref_out).abs().max().item() <= 1e-5
    remove_(bb.model)
    assert baseline_runtime(bb.model) is None and not hasattr(bb.model, "trimkit_baseline_tokens")
    assert (_out(bb, inputs) - ref_out).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_streams_that_cannot_lose_tokens_are_left_whole():
    bb, inputs = _setup("blip-vqa-tiny")
    report = _apply(bb, inputs, RandomTokensConfig())
    assert "text_decoder.bert.encoder.layer" in report["per_token_streams"]
    assert "text_decoder.bert.encoder.layer" not in report["trimmed_streams"]
    # CLIP pools its text at the end-of-text position: removal breaks that, skip mode keeps the length
    bb, inputs = _setup("clip-tiny")
    report = _apply(bb, inputs, ToMeMergeConfig())
    assert set(report["trimmed_streams"]) == {"text_model.encoder.layers", "vision_model.encoder.layers"}
    assert report["skip_mode_streams"] == ["text_model.encoder.layers"]
    assert any("text_model.encoder.layers" in n and "skip mode" in n for n in report["notes"])


# ----------------------------------------------------------------------------------------------
# Executed FLOPs hit the target
# ----------------------------------------------------------------------------------------------
CALIBRATED = [("random", "blip-vqa-tiny", 0.6), ("topk", "blip-vqa-tiny", 0.75),
              ("tome", "blip-itm-tiny", 0.6), ("random", "blip-itm-tiny", 0.75),
              ("topk", "vilt-vqa-tiny", 0.6), ("tome", "vilt-vqa-tiny", 0.75),
              ("tome", "clip-tiny", 0.75), ("random", "clip-tiny", 0.75),
              ("topk", TOYS[0], 0.6), ("tome", TOYS[0], 0.75),
              ("tome", TOYS[1], 0.6), ("topk", TOYS[1], 0.75),
              ("random", "bridgetower-itm-tiny", 0.6), ("topk", "bridgetower-itm-tiny", 0.5),
              ("tome", "bridgetower-itm-tiny", 0.5)]


@pytest.mark.parametrize("method,ref,target", CALIBRATED)
@pytest.mark.slow
def test_flops_ratio_is_hit_in_executed_flops(method, ref, target):
    bb, inputs = _setup(ref)
    full = count_flops(bb.model, inputs).flops
    report = _apply(bb, inputs, CONFIGS[method](flops_ratio=target))
    measured = count_flops(bb.model, inputs).flops / full
    assert abs(measured - target) <= 0.02, (measured, report)
    assert abs(report["flops_ratio"] - measured) <= 1e-3  # the pass measures one row, this the batch
    assert report["keep_ratio"] != 0.5  # calibrated, not the default


def test_unreachable_flops_ratio_is_reported():
    bb, inputs = _setup("bridgetower-itm-tiny")
    report = _apply(bb, inputs, RandomTokensConfig(flops_ratio=0.5, streams="cross_modal_image"))
    assert report["trimmed_streams"] == ["bridgetower.cross_modal_image_layers"]
    assert report["flops_ratio"] > 0.52
    assert any("closest this schedule reaches" in n for n in report["notes"]), report["notes"]


# ----------------------------------------------------------------------------------------------
# Skip mode: streams whose every layer output is read at full length (BridgeTower's towers)
# ----------------------------------------------------------------------------------------------
BT_SKIP = {"bridgetower.text_model.encoder.layer", "bridgetower.vision_model.visual.transformer.resblocks",
           "bridgetower.cross_modal_text_layers"}


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.slow
def test_bridgetower_towers_trim_in_skip_mode_and_batches_agree(method):
    bb, inputs = _setup("bridgetower-itm-tiny")
    inputs["attention_mask"][1, 5:] = 0  # a padded row: padding is dropped first, rows still agree
    report = _apply(bb, inputs, CONFIGS[method](keep_ratio=0.5))
    assert set(report["skip_mode_streams"]) == BT_SKIP, report
    assert set(report["trimmed_streams"]) == BT_SKIP | {"bridgetower.cross_modal_image_layers"}
    rt = baseline_runtime(bb.model)
    batched = _out(bb, inputs)
    for stream in BT_SKIP:
        st = rt.state.streams[stream]
        assert st.index is None and st.alive.shape == (3, st.length)  # full length, alive tokens marked
        assert (st.alive.sum(1) < st.length).all()
    assert (_rows(bb, inputs) - batched).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_stream_whose_removal_fails_the_forward_check_falls_back_to_skip_mode():
    # from layer 0 on, BridgeTower's text tower needs equal lengths from layer to layer (its bridges):
    # the structural probe (which also runs a padded batch) or the baseline's own check catches that
    bb, inputs = _setup("bridgetower-itm-tiny")
    full = count_flops(bb.model, inputs).flops
    report = _apply(bb, inputs, RandomTokensConfig(flops_ratio=0.33, start_layer=0))
    assert "bridgetower.text_model.encoder.layer" in report["skip_mode_streams"]
    assert any(n.startswith("stream 'bridgetower.text_model.encoder.layer'") and "skip" in n
               for n in report["notes"]), report["notes"]
    assert abs(count_flops(bb.model, inputs).flops / full - 0.33) <= 0.02


def test_skip_mode_carries_pruned_tokens_through_unchanged():
    bb, inputs = _setup("bridgetower-itm-tiny")
    stream = "bridgetower.text_model.encoder.layer"
    layers = list(bb.model.bridgetower.text_model.encoder.layer)
    seen: dict[int, torch.Tensor] = {}

    def keep_input(i):
        return lambda m, args, kwargs: seen.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone())

    handles = [layer.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, layer in enumerate(layers)]
    _apply(bb, inputs, RandomTokensConfig(keep_ratio=0.4, streams="text_model"))
    last = {}
    handles.append(layers[-1].register_forward_hook(lambda m, a, out: last.update(out=out)))
    _out(bb, inputs)
    for h in handles:
        h.remove()
    out = last["out"][0] if isinstance(last["out"], tuple) else last["out"]
    alive = baseline_runtime(bb.model).state.streams[stream].alive
    assert out.shape[1] == alive.shape[1]  # the tower's output keeps its full length
    dead = (~alive).nonzero().tolist()
    assert dead
    for b, t in dead:  # a pruned token leaves with the state it had entering the layer that pruned it
        assert any(torch.equal(out[b, t], seen[i][b, t]) for i in range(1, len(layers))), (b, t)
    for b, t in alive.nonzero().tolist():
        assert not torch.equal(out[b, t], seen[len(layers) - 1][b, t])


# ----------------------------------------------------------------------------------------------
# Method specifics
# ----------------------------------------------------------------------------------------------
def _index(bb, inputs, stream):
    _out(bb, inputs)
    return baseline_runtime(bb.model).state.streams[stream].index.clone()


def test_random_is_deterministic_per_seed_and_differs_across_seeds():
    bb, inputs = _setup(TOYS[1])
    _apply(bb, inputs, RandomTokensConfig(seed=0))
    first, again = _index(bb, inputs, "blocks"), _index(bb, inputs, "blocks")
    assert torch.equal(first, again)
    remove_(bb.model)
    _apply(bb, inputs, RandomTokensConfig(seed=0))
    assert torch.equal(_index(bb, inputs, "blocks"), first)
    remove_(bb.model)
    _apply(bb, inputs, RandomTokensConfig(seed=1))
    assert not torch.equal(_index(bb, inputs, "blocks"), first)


def test_topk_on_vilt_does_not_depend_on_its_patch_shuffle():
    # ViLT permutes its patch tokens with the global generator on every forward; [CLS] attention
    # follows the patches, so top-k keeps the same patches (random and ToMe pick by position and
    # are repeatable only under a fixed seed)
    bb, inputs = _setup("vilt-vqa-tiny")
    _apply(bb, inputs, TopKClsAttentionConfig(keep_ratio=0.4))
    torch.manual_seed(0)
    first = _out(bb, inputs)
    torch.manual_seed(1)
    assert (_out(bb, inputs) - first).abs().max().item() <= 1e-5


def _toy_cls_attention(model, x):
    """[CLS] attention of the toy's first vision layer, mean over heads, computed by hand."""
    attn = model.vision[0].attn
    h = model.vision[0].norm1(x)
    b, n, d = h.shape
    q, k, _ = attn.to_qkv(h).chunk(3, dim=-1)
    q, k = (t.reshape(b, n, attn.heads, d // attn.heads) for t in (q, k))
    probs = (torch.einsum("bqhd,bkhd->bhqk", q, k) * (d // attn.heads) ** -0.5).softmax(-1)
    return probs[:, :, 0].mean(1)


def test_topk_keeps_what_cls_attends_to_most_in_the_previous_layer():
    bb, inputs = _setup(TOYS[0])
    model = bb.model
    seen = {}
    handle = model.vision[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    _apply(bb, inputs, TopKClsAttentionConfig(keep_ratio=0.4, streams="vision"))
    seen.clear()
    index = _index(bb, inputs, "vision")
    handle.remove()
    with torch.no_grad():
        scores = _toy_cls_attention(model, seen["x"])
    count = keep_counts(16, 0.4, 1)[0]
    top = scores[:, 1:].topk(count, dim=1).indices + 1
    expected = torch.cat([torch.zeros(len(top), 1, dtype=torch.long), top.sort(1).values], dim=1)
    assert torch.equal(index, expected)


@pytest.mark.parametrize("cls", [torch.tensor([0, 3]), 5, None])
def test_cls_attention_is_read_alike_from_softmax_sdpa_and_mha(cls):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 6, 6)
    mask[1, ..., 4:] = torch.finfo(torch.float32).min  # padded keys of row 1
    probs = ((q @ k.transpose(-1, -2)) * 0.5 + mask).softmax(-1)
    rows = torch.tensor([0, 3]) if isinstance(cls, torch.Tensor) else cls
    if rows is None:
        expected = probs.mean(dim=(1, 2))
    else:
        rows = torch.as_tensor(rows).expand(2)
        expected = probs[torch.arange(2), :, rows].mean(1)
    seen = []
    with AttentionMode(CaptureProbs(6, cls, 2, seen.append)):
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with AttentionMode(CaptureProbs(6, cls, 2, seen.append)):
        ((q @ k.transpose(-1, -2)) * 0.5 + mask).softmax(dim=-1)
    with AttentionMode(CaptureProbs(6, cls, 2, seen.append)):  # [B*H, L, L] scores
        ((q @ k.transpose(-1, -2)) * 0.5 + mask).reshape(6, 6, 6).softmax(-1)
    assert len(seen) == 3
    for got in seen:
        assert torch.allclose(got, expected, atol=1e-6)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 6, 8, generator=g)
    with torch.no_grad():
        plain, _ = mha(x, x, x, need_weights=False)
        weights = mha(x, x, x, need_weights=True, average_attn_weights=False)[1]
        with AttentionMode(CaptureProbs(6, cls, 2, seen.append)):
            out, none = mha(x, x, x, need_weights=False)
    assert none is None and torch.allclose(out, plain, atol=1e-6)
    expected = weights.mean(dim=(1, 2)) if rows is None else weights[torch.arange(2), :, rows].mean(1)
    assert torch.allclose(seen[-1], expected, atol=1e-6)


@pytest.mark.slow
def test_topk_reads_sdpa_and_eager_attention_alike():
    kept = []
    for impl in ("sdpa", "eager"):
        bb = load_backbone("clip-tiny", attn_implementation=impl)
        inputs = bb.example_inputs(3)
        _apply(bb, inputs, TopKClsAttentionConfig(keep_ratio=0.4))
        kept.append(_index(bb, inputs, "vision_model.encoder.layers"))
    assert torch.equal(kept[0], kept[1])


@pytest.mark.parametrize("ref", ["blip-itm-tiny", TOYS[0], TOYS[1]])
def test_tome_sizes_sum_to_the_original_length(ref):
    bb, inputs = _setup(ref)
    report = _apply(bb, inputs, ToMeMergeConfig(keep_ratio=0.4))
    _out(bb, inputs)
    rt = baseline_runtime(bb.model)
    sizes = rt.decider.sizes()
    assert set(sizes) == set(report["trimmed_streams"])
    for stream, size in sizes.items():
        st = rt.state.streams[stream]
        assert size.shape == st.index.shape
        assert torch.allclose(size.sum(1), torch.full((size.shape[0],), float(st.length)))
        assert (size > 1).any()
        for p in _specials(rt, stream, st.length):
            assert (size[st.index == p] == 1).all(), "special tokens are never merged"


def test_tome_merging_differs_from_plain_removal(monkeypatch):
    bb, inputs = _setup(TOYS[0])
    _apply(bb, inputs, ToMeMergeConfig(keep_ratio=0.4, proportional=False))
    merged = _out(bb, inputs)
    index = baseline_runtime(bb.model).state.streams["vision"].index.clone()
    real = tome.bipartite_merge

    def removal_only(x, size, prunable, merge, group=None):
        _, new_size, keep = real(x, size, prunable, merge, group)
        return x, new_size, keep

    monkeypatch.setattr(tome, "bipartite_merge", removal_only)
    removed = _out(bb, inputs)
    assert torch.equal(baseline_runtime(bb.model).state.streams["vision"].index, index)  # same survivors
    assert (merged - removed).abs().max().item() > 1e-4


def test_tome_proportional_attention_adds_log_size_to_keys():
    bb, inputs = _setup(TOYS[0])
    _apply(bb, inputs, ToMeMergeConfig(keep_ratio=0.4))
    with_bias = _out(bb, inputs)
    rt = baseline_runtime(bb.model)
    st, size = rt.state.streams["vision"], rt.decider.sizes()["vision"]
    mask = rt.key_mask("vision", st)
    assert torch.allclose(mask[:, 0, 0], size.log())
    # the bias reaches the attention: turning it off changes the outputs
    rt.decider.proportional = False
    assert rt.key_mask("vision", st) is None
    assert (_out(bb, inputs) - with_bias).abs().max().item() > 1e-5


def test_tome_keeps_padding_apart_from_real_tokens():
    bb, inputs = _setup("blip-itm-tiny")
    mask = inputs["attention_mask"]
    mask[1, 4:], mask[2, 6:] = 0, 0  # rows 1 and 2 padded
    inputs["input_ids"][mask == 0] = 0
    _apply(bb, inputs, ToMeMergeConfig(keep_ratio=0.4, streams="text"))
    _out(bb, inputs)
    rt = baseline_runtime(bb.model)
    st, size = rt.state.streams["text_encoder.encoder.layer"], rt.decider.sizes()["text_encoder.encoder.layer"]
    real = mask.gather(1, st.index).bool()
    # the mass of real tokens stays on real tokens unless a row ran out of them
    for row in range(mask.shape[0]):
        n_real = int(mask[row].sum())
        if real[row].sum() > 1:
            assert size[row][real[row]].sum().item() == n_real


# ----------------------------------------------------------------------------------------------
# Training with a baseline in place
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("ref", ["blip-itm-tiny", "vilt-vqa-tiny", "bridgetower-itm-tiny", TOYS[1]])
@pytest.mark.slow
def test_train_mode_removes_tokens_and_backbone_gets_gradients(ref, method):
    bb, inputs = _setup(ref)
    _apply(bb, inputs, CONFIGS[method]())
    model = bb.model.train()
    logits = bb.task.logits(model(**inputs))
    logits.float().pow(2).mean().backward()
    rt = baseline_runtime(model)
    for stream, stats in trim_stats(model)["tokens"].items():
        if stream in rt.decider.schedule.trimmed():
            assert stats["kept"][-1] < stats["length"], (stream, stats)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) > len(grads) // 2


# ----------------------------------------------------------------------------------------------
# Saved folders
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ref,config", [("vilt-vqa-tiny", ToMeMergeConfig(flops_ratio=0.7)),
                                        (TOYS[0], TopKClsAttentionConfig(flops_ratio=0.75)),
                                        ("bridgetower-itm-tiny", TopKClsAttentionConfig(flops_ratio=0.5)),
                                        (TOYS[1], RandomTokensConfig(seed=3, keep_ratio=0.3))])
@pytest.mark.slow
def test_saved_folder_restores_exactly(tmp_path, ref, config):
    bb = load_backbone(ref)
    inputs = bb.example_inputs(2)
    report = _apply(bb, inputs, config)
    torch.manual_seed(0)  # ViLT shuffles its patches with the global generator
    expected = _out(bb, inputs)
    out = save_folder(tmp_path / "saved", base_ref=ref, model=bb.model)
    restored = load_folder(out)
    schedule = restored.model.trimkit_baseline_tokens
    assert float(schedule.keep_ratio) == report["keep_ratio"]
    assert schedule.trimmed() == report["trimmed_streams"] and schedule.skipped() == report["skip_mode_streams"]
    torch.manual_seed(0)
    assert torch.equal(_out(restored, inputs), expected)
