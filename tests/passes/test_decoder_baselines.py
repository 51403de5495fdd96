"""fastv.tokens and visionzip.tokens on llava-tiny: pure pieces, merges in the decoder runtime, exact when
off, executed-FLOPs calibration, image tokens only, greedy decoding with the KV cache (batched = rows)."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from trimkit.backbones import load_backbone
from trimkit.errors import ConfigError
from trimkit.io import load_folder, save_folder
from trimkit.locate import locate
from trimkit.passes import apply_, config_from_dict, config_to_dict
from trimkit.passes.baselines import BaselineSchedule, baseline_runtime
from trimkit.passes.baselines import closest_at
from trimkit.passes.decoder_baselines import default_layer, image_counts, rank_keep
from trimkit.passes.fastv import FastVTokensConfig, last_positions
from trimkit.passes.visionzip import VisionZipTokensConfig, context_counts, map_vision_scores, vision_layout, zip_row
from trimkit.profile import count_flops
from trimkit.runtime import DecoderRuntime, TokenDecider, TokenDecision, capture_padded, set_threshold

CONFIGS = {"fastv": FastVTokensConfig, "visionzip": VisionZipTokensConfig}


def _setup(batch=3, padded=True):
    bb = load_backbone("llava-tiny")
    inputs = bb.example_inputs(batch)
    if padded:  # row 0 left-padded by 3 (as generation pads): its last 3 text tokens are cut
        ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
        ids[0] = torch.cat([torch.zeros(3, dtype=ids.dtype), ids[0, :-3]])
        mask[0, :3] = 0
        inputs = {**inputs, "input_ids": ids, "attention_mask": mask}
    return bb, inputs


def _apply(bb, inputs, config):
    return apply_(bb.model, [config], inputs=inputs, hints=bb.hints).results[0].report


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@torch.no_grad()
def _greedy(model, inputs, steps=4):
    """Greedy decoding with a dynamic KV cache; positions from the padding mask (left padding)."""
    mask = inputs["attention_mask"]
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    out = model(**inputs, position_ids=pos, cache=DynamicCache(), use_cache=True)
    tokens = []
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=out.past_key_values, use_cache=True)
    return torch.cat(tokens, 1)


def _rows(inputs):
    for i in range(inputs["input_ids"].shape[0]):
        real = inputs["attention_mask"][i].bool()
        yield {"pixel_values": inputs["pixel_values"][i:i + 1], "input_ids": inputs["input_ids"][i:i + 1, real],
               "attention_mask": inputs["attention_mask"][i:i + 1, real]}


# ----------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------
def test_image_counts_and_rank_keep():
    assert image_counts(torch.tensor([16, 16, 3, 0]), 0.25).tolist() == [4, 4, 1, 0]
    assert image_counts(torch.tensor([16, 5]), 1.0).tolist() == [16, 5]
    assert image_counts(torch.tensor([16]), 0.01).tolist() == [1]
    cand = torch.tensor([[False, True, True, True, False], [True, True, False, False, False]])
    scores = torch.tensor([[9.0, 1.0, 3.0, 2.0, 0.0], [0.5, 0.7, 9.0, 9.0, 9.0]])
    keep = rank_keep(scores, cand, torch.tensor([2, 1]))
    assert keep.tolist() == [[True, False, True, True, True], [False, True, True, True, True]]


def test_closest_at_is_a_binary_search():
    calls = []

    def measure(v):
        calls.append(v)
        return v * v

    values = [i / 100 for i in range(101)]
    value, ratio = closest_at(values, measure, 0.25)
    assert value == 0.5 and ratio == 0.25
    assert len(calls) <= 9
    assert closest_at(values, measure, 2.0)[0] == 1.0 and closest_at(values, measure, -1.0)[0] == 0.0


def test_default_layer():
    assert default_layer(-1, 4) == 1 and default_layer(-1, 32) == 2 and default_layer(3, 4) == 3
    with pytest.raises(ConfigError, match="first layer keeps every token"):
        default_layer(0, 4)
    with pytest.raises(ConfigError, match="out of range"):
        default_layer(4, 4)


def test_last_positions():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    assert last_positions(mask, 3, 4).tolist() == [2, 3, 3]
    assert last_positions(None, 2, 5).tolist() == [4, 4]


def test_vision_layout_and_map_vision_scores():
    assert vision_layout(2, 17, 32) == (True, 1)  # one [CLS] per image left out of the splice
    assert vision_layout(2, 16, 32) == (False, 1)
    assert vision_layout(1, 64, 16) == (False, 4)  # 2x2 patch merging
    assert vision_layout(1, 10, 7) is None
    cand = torch.tensor([[False, True, True, False], [True, True, False, False]])
    rows = torch.tensor([[9.0, 1.0, 2.0], [9.0, 3.0, 4.0]])
    out = map_vision_scores(rows, True, 1, cand)
    assert out.tolist() == [[0.0, 1.0, 2.0, 0.0], [3.0, 4.0, 0.0, 0.0]]
    grouped = map_vision_scores(torch.arange(8.0).view(1, 8), False, 2, cand)
    assert grouped.tolist() == [[0.0, 0.5, 2.5, 0.0], [4.5, 6.5, 0.0, 0.0]]
    assert map_vision_scores(torch.zeros(1, 5), False, 1, cand) is None


def test_context_counts_and_zip_row():
    assert context_counts(torch.tensor([1, 2, 10, 40]), 0.15).tolist() == [0, 1, 2, 6]
    assert context_counts(torch.tensor([10]), 0.0).tolist() == [0]
    hidden = torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [7.0, 7.0]])
    cand = torch.tensor([False, True, True, True, True, False])
    dominant = torch.tensor([False, True, False, False, False, False])
    index, states = zip_row(hidden, cand, dominant, 2)
    # the rest (2, 3, 4) has targets 2 and 3 (evenly spaced); 4 is closest to 2
    assert index.tolist() == [0, 1, 2, 3, 5]
    assert torch.allclose(states[2], (hidden[2] + hidden[4]) / 2) and torch.equal(states[3], hidden[3])
    assert torch.equal(states[[0, 1, 4]], hidden[[0, 1, 5]])
    index, states = zip_row(hidden, cand, dominant, 0)
    assert index.tolist() == [0, 1, 5] and torch.equal(states, hidden[[0, 1, 5]])


def test_configs_round_trip_and_validate():
    for cls in CONFIGS.values():
        config = cls(keep=0.3, flops_ratio=0.7, layer=2, threshold=0.25)
        assert config_from_dict(config_to_dict(config)) == config
        for bad in ({"keep": 0.0}, {"flops_ratio": 1.5}, {"threshold": -0.1}, {"layer": -2}):
            with pytest.raises(ConfigError):
                cls(**bad).validate()
    with pytest.raises(ConfigError):
        VisionZipTokensConfig(context=1.0).validate()


# ----------------------------------------------------------------------------------------------
# Merges in the decoder runtime
# ----------------------------------------------------------------------------------------------
class _Fixed(TokenDecider):
    """Drops image tokens 1 and 2 of every row (and the last one of row 1), by removal or as a merge
    whose survivors keep their states (``-1`` pads row 1, which keeps one fewer)."""

    def __init__(self, merge: bool):
        self.merge = merge

    def decide(self, step):
        if step.threshold <= 0:
            return None
        b, length = step.hidden.shape[:2]
        keep = torch.ones(b, length, dtype=torch.bool)
        for r in range(b):
            image = step.candidates[r].nonzero().view(-1)
            keep[r, image[1:3]] = False
            if r == 1:
                keep[r, image[-1]] = False
        if not self.merge:
            return TokenDecision(keep=keep)
        k = int(keep.sum(1).max())
        index = torch.full((b, k), -1, dtype=torch.long)
        for r in range(b):
            kept = keep[r].nonzero().view(-1).flip(0)  # out of order on purpose: the runtime sorts
            index[r, :kept.numel()] = kept
        merged = torch.gather(step.hidden, 1, index.clamp_min(0).unsqueeze(-1).expand(-1, -1, step.hidden.shape[-1]))
        return TokenDecision(merged=merged, index=index)


def _runtime(bb, model_map, cap, decider):
    lm = model_map.stream(model_map.image_span["stream"])
    vision = [la.path for s in model_map.streams if s.modality == "vision" for la in s.layers]
    return DecoderRuntime(bb.model, model_map, cap, decider, lm.name, [la.path for la in lm.layers],
                          [lm.layers[1].path], vision)


@pytest.mark.slow
def test_decoder_runtime_merge_follows_survivors_like_removal():
    bb, inputs = _setup()
    ref = _logits(bb.model, inputs)
    model_map, cap = locate(bb.model, inputs, hints=bb.hints), capture_padded(bb.model, inputs)
    outs, tokens = {}, {}
    for merge in (False, True):
        rt = _runtime(bb, model_map, cap, _Fixed(merge))
        try:
            outs[merge] = _logits(bb.model, inputs)
            tokens[merge] = _greedy(bb.model, inputs)
            assert rt.stats()["tokens"][rt.stream]["kept"] == [pytest.approx((22 + 21 + 22) / 3)]
        finally:
            rt.remove()
    assert (outs[True] - outs[False]).abs().max().item() <= 1e-5
    assert (outs[True] - ref).abs().max().item() > 1e-3
    assert torch.equal(tokens[True], tokens[False])


def test_decoder_runtime_rejects_a_malformed_merge():
    bb, inputs = _setup(padded=False)

    class Bad(TokenDecider):
        def decide(self, step):
            return TokenDecision(merged=step.hidden[:, :3, :5], index=torch.zeros(2, 3, dtype=torch.long))

    rt = _runtime(bb, locate(bb.model, inputs, hints=bb.hints), capture_padded(bb.model, inputs), Bad())
    try:
        with pytest.raises(Exception, match="a merge needs states"):
            _logits(bb.model, inputs)
    finally:
        rt.remove()


# ----------------------------------------------------------------------------------------------
# The passes on llava-tiny
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.slow
def test_keep_all_reproduces_the_model(method):
    bb, inputs = _setup()
    ref = _logits(bb.model, inputs)
    ref_tokens = _greedy(bb.model, inputs)
    _apply(bb, inputs, CONFIGS[method](keep=0.25))
    assert (_logits(bb.model, inputs) - ref).abs().max().item() > 1e-3  # it trims
    set_threshold(bb.model, 0.0)
    assert (_logits(bb.model, inputs) - ref).abs().max().item() <= 1e-5
    assert torch.equal(_greedy(bb.model, inputs), ref_tokens)
    bb2, _ = _setup()
    _apply(bb2, inputs, CONFIGS[method](keep=1.0))
    assert (_logits(bb2.model, inputs) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method,target", [("fastv", 0.85), ("visionzip", 0.75)])
@pytest.mark.slow
def test_flops_ratio_is_hit_in_executed_flops(method, target):
    bb, inputs = _setup()
    full = count_flops(bb.model, inputs).flops
    report = _apply(bb, inputs, CONFIGS[method](flops_ratio=target))
    measured = count_flops(bb.model, inputs).flops / full
    assert abs(measured - target) <= 0.02, (measured, report)
    assert report["keep"] != 0.5  # calibrated, not the default
    assert abs(report["flops_ratio"] - target) <= 0.02


@pytest.mark.parametrize("method", list(CONFIGS))
def test_only_image_tokens_leave_and_decoding_batched_equals_rows(method):
    bb, inputs = _setup()
    report = _apply(bb, inputs, CONFIGS[method](keep=0.25))
    rt = baseline_runtime(bb.model)
    assert report["layer"] == 1 and report["stream"] == rt.stream
    _logits(bb.model, inputs)
    st = rt.pre
    assert st.index is not None
    for r in range(3):
        kept = set(st.index[r][st.valid[r]].tolist())
        assert set((~st.image[r]).nonzero().view(-1).tolist()) <= kept  # text (and padding) all there
        assert sum(bool(st.image[r, p]) for p in kept) == 4  # round(16 * 0.25) image tokens
    batched = _greedy(bb.model, inputs)
    assert torch.equal(batched, torch.cat([_greedy(bb.model, row) for row in _rows(inputs)]))


def test_visionzip_reads_the_feeding_vision_layer_and_merges():
    bb, inputs = _setup()
    report = _apply(bb, inputs, VisionZipTokensConfig(keep=0.5, context=0.25))
    assert report["scores"] == "vision"
    # llava's vision_feature_layer = -2: the second-to-last vision layer feeds the splice; its [CLS] is left out
    assert any("[CLS] query's attention in model.vision_tower.encoder.layers.1.self_attn" in n
               for n in report["notes"]), report["notes"]
    rt = baseline_runtime(bb.model)
    assert isinstance(bb.model.trimkit_baseline_tokens, BaselineSchedule)
    seen = {}
    orig = rt.decider.choose

    def spy(step, counts):
        d = orig(step, counts)
        seen["d"], seen["step"] = d, step
        return d

    rt.decider.choose = spy
    _logits(bb.model, inputs)
    d, step = seen["d"], seen["step"]
    assert d.merged is not None and d.index.shape == (3, 16)  # 8 text + 6 dominant + 2 contextual
    same = torch.isclose(d.merged, torch.gather(step.hidden, 1, d.index.unsqueeze(-1).expand_as(d.merged))).all(-1)
    assert ((~same).sum(1) == 2).all()  # exactly the two contextual tokens carry merged states


def test_pass_errors_are_one_line():
    bb = load_backbone("blip-vqa-tiny")
    with pytest.raises(ConfigError, match="splices no image features"):
        _apply(bb, bb.example_inputs(2), FastVTokensConfig())
    bb, inputs = _setup(padded=False)
    with pytest.raises(ConfigError, match="first layer keeps every token"):
        _apply(bb, inputs, VisionZipTokensConfig(layer=0))


def test_generate_trims_the_prefill():
    bb, inputs = _setup(padded=False)
    _apply(bb, inputs, FastVTokensConfig(keep=0.25))
    rt = baseline_runtime(bb.model)
    calls = []
    orig = rt.decider.choose
    rt.decider.choose = lambda step, counts: calls.append(1) or orig(step, counts)
    bb.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert calls


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.slow
def test_saved_folder_restores_exactly(tmp_path, method):
    bb, inputs = _setup()
    report = _apply(bb, inputs, CONFIGS[method](flops_ratio=0.8))
    expected, tokens = _logits(bb.model, inputs), _greedy(bb.model, inputs)
    restored = load_folder(save_folder(tmp_path / "saved", base_ref="llava-tiny", model=bb.model))
    assert float(restored.model.trimkit_baseline_tokens.keep_ratio) == report["keep"]
    assert torch.equal(_logits(restored.model, inputs), expected)
    assert torch.equal(_greedy(restored.model, inputs), tokens)


@pytest.mark.slow
def test_visionzip_falls_back_to_language_model_attention(monkeypatch):
    import trimkit.passes.visionzip as vz
    monkeypatch.setattr(vz, "vision_layout", lambda *args: None)  # a tower whose tokens do not map
    bb, inputs = _setup()
    ref = _logits(bb.model, inputs)
    report = _apply(bb, inputs, VisionZipTokensConfig(keep=0.25))
    assert report["scores"] == "language" and report["layer"] == 1
    assert "model.language_model.layers.0.self_attn" in report["notes"][0], report["notes"]
    assert (_logits(bb.model, inputs) - ref).abs().max().item() > 1e-3
    assert baseline_runtime(bb.model).stats()["tokens"][report["stream"]]["kept"] == [12.0]  # 8 + round(16 / 4)
