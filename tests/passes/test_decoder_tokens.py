"""Image-token trimming inside the language model of decoder VLMs: exactness, removal, batching,
KV-cache-consistent generation, save and load."""
from __future__ import annotations

import copy

import pytest
import torch

from trimkit.backbones import load_backbone
from trimkit.locate import locate
from trimkit.passes import apply_
from trimkit.passes.smarttrim import SmartTrimTokensConfig
from trimkit.profile import count_flops
from trimkit.runtime import (DecoderRuntime, TokenDecider, TokenDecision, capture_padded, decoder_mask,
                             runtimes, set_threshold, trim_stats)

GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True)


def _left_padded(inputs: dict, short: int = 3) -> dict:
    """Row 1 loses ``short`` text tokens from its end and is left-padded back to the batch length."""
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    ids[1] = torch.cat([torch.zeros(short, dtype=ids.dtype), ids[1, :-short]])
    mask[1, :short] = 0
    return {**inputs, "input_ids": ids, "attention_mask": mask}


def _row(inputs: dict, i: int) -> dict:
    real = inputs["attention_mask"][i].bool()
    return {"pixel_values": inputs["pixel_values"][i:i + 1], "input_ids": inputs["input_ids"][i:i + 1, real],
            "attention_mask": inputs["attention_mask"][i:i + 1, real]}


def _positions(inputs: dict) -> torch.Tensor:
    return (inputs["attention_mask"].cumsum(1) - 1).clamp_min(0)


def _spread(model, inputs: dict, seed: int = 0) -> None:
    """Random trimmer weights, centred so that about half the image tokens of each trimmed layer are
    kept at threshold 0.5: decisions then differ per token and per row."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trimkit_token_trimmers.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    rt = runtimes(model)[0]
    trimmers, score = rt.decider.trimmers, rt.decider.logits
    for path, trimmer in trimmers.items():  # layer by layer: later layers see the earlier decisions
        seen = []

        def spy(step, g_self, g_other, fast, path=path):
            z = score(step, g_self, g_other, fast)
            if step.layer == path:
                seen.append(z[step.candidates])
            return z

        rt.decider.logits = spy
        with torch.no_grad():
            model(**inputs)
            if seen and seen[0].numel():
                trimmer.score.bias -= seen[0].median() + 0.05  # no logit exactly at the threshold
    rt.decider.logits = score


@pytest.fixture(scope="module")
def llava():
    bb = load_backbone("llava-tiny")
    return bb, bb.example_inputs(2)


def _trimmed(llava, threshold=0.5, **kw):
    bb, inputs = llava
    model = copy.deepcopy(bb.model)
    apply_(model, SmartTrimTokensConfig(threshold=threshold, **kw), inputs=inputs, hints=bb.hints)
    return model


def test_image_span_is_found_from_dataflow(llava):
    bb, inputs = llava
    span = locate(bb.model, inputs, hints=bb.hints).image_span
    placeholders = inputs["input_ids"] == bb.model.config.image_token_index
    assert span["stream"] == "model.language_model.layers"
    assert span["ops"] == ["masked_scatter"]
    assert span["positions"] == [row.nonzero().view(-1).tolist() for row in placeholders]


def test_threshold_zero_reproduces_logits_and_generation(llava):
    bb, inputs = llava
    model = _trimmed(llava, threshold=0.0)
    batch = _left_padded(inputs)
    with torch.no_grad():
        for x in (inputs, batch):
            ref = bb.model(**x, position_ids=_positions(x)).logits
            got = model(**x, position_ids=_positions(x)).logits
            assert (ref - got).abs().max().item() <= 1e-5
    assert torch.equal(bb.model.generate(**batch, **GEN), model.generate(**batch, **GEN))


def test_threshold_one_removes_every_image_token_and_their_flops(llava):
    bb, inputs = llava
    model = _trimmed(llava, threshold=1.0)
    with torch.no_grad():
        model(**inputs)
    stats = trim_stats(model)["tokens"]["model.language_model.layers"]
    assert stats["image_tokens"] == 16 and stats["kept"] == [8.0, 8.0, 8.0]

    layers = {f"model.language_model.layers.{i}": "layer" for i in range(4)}

    def lm_flops(m):
        report = count_flops(m, inputs, blocks=layers)
        return sum(b.flops for b in report.blocks if b.path in layers)

    before, after = lm_flops(bb.model), lm_flops(model)
    share = 16 / 24
    assert after <= before * (1 - share / 2), (before, after)


def test_padded_batch_equals_its_rows(llava):
    model = _trimmed(llava, threshold=0.5)
    batch = _left_padded(llava[1])
    _spread(model, batch)
    with torch.no_grad():
        out = model(**batch, position_ids=_positions(batch)).logits
        kept = [k.tolist() for k in runtimes(model)[0].pre.kept]
        assert any(len(set(k)) > 1 for k in kept), kept  # the rows keep different counts
        for i in range(2):
            row = _row(batch, i)
            alone = model(**row, position_ids=_positions(row)).logits
            real = batch["attention_mask"][i].bool()
            assert (out[i, real] - alone[0]).abs().max().item() <= 1e-4
    generated = model.generate(**batch, **GEN)[:, -5:]
    for i in range(2):
        assert torch.equal(generated[i], model.generate(**_row(batch, i), **GEN)[0, -5:])


class _EveryThird(TokenDecider):
    """Drops the image tokens whose original position is a multiple of 3: the same tokens whatever
    the sequence continues with, so a cached and an uncached generation must agree."""

    def decide(self, step):
        keep = (step.positions() % 3 != 0) | ~step.candidates
        return TokenDecision(keep=keep if step.valid is None else keep & step.valid)


@pytest.mark.parametrize("layers", [[1], [1, 2]], ids=["one", "two"])
def test_cached_decoding_attends_to_what_the_prefill_kept(llava, layers):
    bb, inputs = llava
    model = copy.deepcopy(bb.model)
    mm = locate(model, inputs, hints=bb.hints)
    lm = mm.stream(mm.image_span["stream"])
    vision = [la.path for s in mm.streams if s.modality == "vision" for la in s.layers]
    rt = DecoderRuntime(model, mm, capture_padded(model, inputs), _EveryThird(), lm.name,
                        [la.path for la in lm.layers], [lm.layers[i].path for i in layers], vision)
    batch = _left_padded(inputs)
    cached = model.generate(**batch, output_scores=True, return_dict_in_generate=True, **GEN)
    assert rt.gen is not None and rt.gen.seen == 4  # the prefill kept a layout, four decoding steps used it
    fresh = model.generate(**batch, output_scores=True, return_dict_in_generate=True, **{**GEN, "use_cache": False})
    assert torch.equal(cached.sequences, fresh.sequences)
    for a, b in zip(cached.scores, fresh.scores):
        finite = torch.isfinite(a) & torch.isfinite(b)
        assert (a[finite] - b[finite]).abs().max().item() <= 1e-4
    untrimmed = bb.model.generate(**batch, output_scores=True, return_dict_in_generate=True, **GEN)
    assert (cached.scores[0] - untrimmed.scores[0]).nan_to_num().abs().max().item() > 1e-3  # it did trim
    rt.remove()


def test_save_load_generate_is_exact(llava, tmp_path):
    import trimkit
    from trimkit.io import hf_base_writer, save_folder

    bb, inputs = llava
    model = _trimmed(llava, threshold=0.5)
    _spread(model, inputs, seed=1)
    save_folder(tmp_path / "m", base_ref="llava-tiny", model=model, base_model_dir_writer=hf_base_writer(bb.model))
    loaded = trimkit.load(str(tmp_path / "m")).model
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    assert torch.equal(model.generate(**inputs, **GEN), loaded.generate(**inputs, **GEN))


def test_training_forward_relaxes_and_reaches_the_trimmers(llava):
    from trimkit.cost import cost_model, expected_ratio

    bb, inputs = llava
    model = _trimmed(llava, threshold=0.5)
    cost_model(model)
    model.train()
    torch.manual_seed(0)
    out = model(**inputs)
    rt = runtimes(model)[0]
    assert rt.pre.mask is not None and rt.pre.mask.shape == (2, 24)
    ratio = expected_ratio(model)
    (out.logits.square().mean() + ratio).backward()
    grads = [p.grad for p in model.trimkit_token_trimmers.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # text tokens are never dropped, in training either
    image = rt.pre.image
    assert bool((rt.pre.mask[~image] == 1).all())


def test_decoder_mask_is_causal_over_original_positions():
    pos = torch.tensor([[0, 2, 5, 0]])
    valid = torch.tensor([[True, True, True, False]])
    m = decoder_mask(pos, pos, valid, valid, None)[0, 0]
    assert m.tolist() == [[True, False, False, False], [True, True, False, False], [True, True, True, False],
                          [False, False, False, True]]
    add = decoder_mask(pos, pos, valid, valid, torch.zeros(1, dtype=torch.float32))
    assert add.dtype == torch.float32 and bool((add[0, 0][m] == 0).all()) and bool((add[0, 0][~m] < -1e30).all())


def test_threshold_validation_and_stats_outlive_decoding(llava):
    bb, inputs = llava
    model = _trimmed(llava, threshold=0.5)
    _spread(model, inputs)
    model.generate(**inputs, **GEN)
    stats = trim_stats(model)["tokens"]["model.language_model.layers"]
    assert stats["length"] == 24 and len(stats["kept"]) == 3
    set_threshold(model, 0.0)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, bb.model(**inputs).logits)


def test_vision_tower_in_skip_mode_keeps_the_splice_aligned(llava):
    bb, inputs = llava
    model = _trimmed(llava, threshold=0.0, vision="skip")
    with torch.no_grad():
        assert (model(**inputs).logits - bb.model(**inputs).logits).abs().max().item() <= 1e-5
        set_threshold(model, 1.0)
        model(**inputs)
    tokens = trim_stats(model)["tokens"]
    assert tokens["model.vision_tower.encoder.layers"]["kept"][-1] == 1.0  # the [CLS] token only
    assert tokens["model.language_model.layers"]["kept"] == [8.0, 8.0, 8.0]
    vision = {f"model.vision_tower.encoder.layers.{i}": "layer" for i in range(3)}

    def vision_flops(m):
        return sum(b.flops for b in count_flops(m, inputs, blocks=vision).blocks if b.path in vision)

    assert vision_flops(model) < 0.5 * vision_flops(bb.model)
    generated = model.generate(**inputs, **GEN)
    assert generated.shape == (2, 24 + 5)


def test_gather_seq_follows_the_batch_dim_of_mrope_ids():
    from trimkit.runtime.decoder import gather_seq

    ids = torch.arange(3 * 2 * 5).view(3, 2, 5)
    index = torch.tensor([[0, 2], [1, 4]])
    got = gather_seq(ids, index, 2)
    assert got.shape == (3, 2, 2)
    assert got[:, 0].tolist() == ids[:, 0, [0, 2]].tolist() and got[:, 1].tolist() == ids[:, 1, [1, 4]].tolist()
    cos = torch.randn(1, 5, 4)
    assert torch.equal(gather_seq(cos, index, 1)[1], cos[0, [1, 4]])
