"""Image-token trimming inside the language model of decoder VLMs (LLaVA, Qwen2-VL and a plain-PyTorch
decoder with its own attention, rotary positions, KV cache and greedy loop): exactness, removal,
batching, KV-cache-consistent generation, save and load."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from trimkit.backbones import load_backbone
from trimkit.locate import locate
from trimkit.passes import apply_
from trimkit.passes.smarttrim import SmartTrimTokensConfig
from trimkit.profile import count_flops
from trimkit.rows import take_rows
from trimkit.runtime import (DecoderRuntime, TokenDecider, TokenDecision, capture_padded, decoder_mask,
                             runtimes, set_threshold, trim_stats)

NEW = 5
TOY = str(Path(__file__).resolve().parents[1] / "models" / "toy_decoder.py") + ":toy_decoder_factory"
MODELS = ["llava-tiny", "qwen2-vl-tiny", TOY]


def _ids(ref: str) -> str:
    return "toy-decoder" if ref == TOY else ref


def _hf(model) -> bool:
    return hasattr(model, "generation_config")


def _generate(model, inputs: dict, use_cache: bool = True, scores: bool = False):
    """Greedy generation of NEW tokens through the model's own loop: the sequences (and HF's scores)."""
    if _hf(model):
        out = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=use_cache,
                             output_scores=scores, return_dict_in_generate=True)
        return (out.sequences, out.scores) if scores else out.sequences
    seq = model.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], max_new_tokens=NEW,
                         use_cache=use_cache)
    return (seq, None) if scores else seq


def _forward(model, inputs: dict) -> torch.Tensor:
    """Logits of one forward; LLaVA's forward takes left-padded positions from the caller."""
    extra = {}
    if getattr(getattr(model, "config", None), "model_type", "") == "llava":
        extra["position_ids"] = (inputs["attention_mask"].cumsum(1) - 1).clamp_min(0)
    return model(**inputs, **extra).logits


def _seq_aligned(inputs: dict) -> list[str]:
    shape = inputs["input_ids"].shape
    return [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.shape == shape]


def _left_padded(inputs: dict, short: int = 3) -> dict:
    """Row 1 loses ``short`` text tokens from its end and is left-padded back to the batch length."""
    out = dict(inputs)
    for k in _seq_aligned(inputs):
        t = inputs[k].clone()
        t[1] = torch.cat([torch.zeros(short, dtype=t.dtype), t[1, :-short]])
        out[k] = t
    return out


def _row(inputs: dict, i: int) -> dict:
    real = inputs["attention_mask"][i].bool()
    row = take_rows(inputs, [i])
    return {k: v[:, real] if k in _seq_aligned(inputs) else v for k, v in row.items()}


def _image_id(model) -> int:
    cfg = getattr(model, "config", None)
    for name in ("image_token_index", "image_token_id"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    return model.cfg.image_id


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
            _forward(model, inputs)
            if seen and seen[0].numel():
                trimmer.score.bias -= seen[0].median() + 0.05  # no logit exactly at the threshold
    rt.decider.logits = score


_CACHE: dict = {}


def _setup(ref: str):
    if ref not in _CACHE:
        bb = load_backbone(ref)
        _CACHE[ref] = (bb, bb.example_inputs(2) if ref != TOY else bb.example_inputs(2))
    return _CACHE[ref]


def _trimmed(ref: str, threshold=0.5, **kw):
    bb, inputs = _setup(ref)
    model = copy.deepcopy(bb.model)
    apply_(model, SmartTrimTokensConfig(threshold=threshold, **kw), inputs=inputs, hints=bb.hints)
    return model


def _lm(model, inputs, hints=None):
    mm = locate(model, inputs, hints=hints)
    return mm, mm.stream(mm.image_span["stream"])


@pytest.mark.parametrize("ref", MODELS, ids=_ids)
def test_image_span_is_found_from_dataflow(ref):
    bb, inputs = _setup(ref)
    span = locate(bb.model, inputs, hints=bb.hints).image_span
    placeholders = inputs["input_ids"] == _image_id(bb.model)
    assert span["ops"]
    assert span["positions"] == [row.nonzero().view(-1).tolist() for row in placeholders]


@pytest.mark.parametrize("ref", MODELS, ids=_ids)
def test_threshold_zero_reproduces_logits_and_generation(ref):
    bb, inputs = _setup(ref)
    model = _trimmed(ref, threshold=0.0)
    batch = _left_padded(inputs)
    with torch.no_grad():
        for x in (inputs, batch, _row(batch, 1)):
            assert (_forward(bb.model, x) - _forward(model, x)).abs().max().item() <= 1e-5
    for x in (batch, _row(batch, 0)):
        assert torch.equal(_generate(bb.model, x), _generate(model, x))


@pytest.mark.parametrize("ref", MODELS, ids=_ids)
def test_threshold_one_removes_every_image_token_and_their_flops(ref):
    bb, inputs = _setup(ref)
    model = _trimmed(ref, threshold=1.0)
    _, lm = _lm(bb.model, inputs, bb.hints)
    with torch.no_grad():
        _forward(model, inputs)
    stats = trim_stats(model)["tokens"][lm.name]
    real = inputs["attention_mask"].sum(1).float().mean().item()
    images = (inputs["input_ids"] == _image_id(bb.model)).sum(1).float().mean().item()
    assert stats["image_tokens"] == images and len(stats["kept"]) == len(lm.layers) - 1
    assert all(abs(k - (inputs["input_ids"].shape[1] - images)) < 1e-6 for k in stats["kept"])
    layers = {la.path: "layer" for la in lm.layers}

    def lm_flops(m):
        return sum(b.flops for b in count_flops(m, inputs, blocks=layers).blocks if b.path in layers)

    before, after = lm_flops(bb.model), lm_flops(model)
    share = images / real
    assert after <= before * (1 - share / 2), (before, after, share)


@pytest.mark.parametrize("ref", MODELS, ids=_ids)
def test_padded_batch_equals_its_rows(ref):
    bb, inputs = _setup(ref)
    model = _trimmed(ref, threshold=0.5)
    batch = _left_padded(inputs)
    _spread(model, batch)
    with torch.no_grad():
        out = _forward(model, batch)
        kept = [k.tolist() for k in runtimes(model)[0].pre.kept]
        assert any(len(set(k)) > 1 for k in kept), kept  # the rows keep different counts
        for i in range(2):
            alone = _forward(model, _row(batch, i))
            real = batch["attention_mask"][i].bool()
            assert (out[i, real] - alone[0]).abs().max().item() <= 1e-4
    generated = _generate(model, batch)[:, -NEW:]
    for i in range(2):
        assert torch.equal(generated[i], _generate(model, _row(batch, i))[0, -NEW:])


class _EveryThird(TokenDecider):
    """Drops the image tokens whose original position is a multiple of 3: the same tokens whatever
    the sequence continues with, so a cached and an uncached generation must agree."""

    def decide(self, step):
        keep = (step.positions() % 3 != 0) | ~step.candidates
        return TokenDecision(keep=keep if step.valid is None else keep & step.valid)


@pytest.mark.parametrize("ref", MODELS, ids=_ids)
@pytest.mark.parametrize("layers", [[1], [1, 2]], ids=["one", "two"])
def test_cached_decoding_attends_to_what_the_prefill_kept(ref, layers):
    bb, inputs = _setup(ref)
    model = copy.deepcopy(bb.model)
    mm, lm = _lm(model, inputs, bb.hints)
    vision = [la.path for s in mm.streams if s.modality == "vision" for la in s.layers]
    rt = DecoderRuntime(model, mm, capture_padded(model, inputs), _EveryThird(), lm.name,
                        [la.path for la in lm.layers], [lm.layers[i].path for i in layers], vision)
    batch = _left_padded(inputs)
    cached, cached_scores = _generate(model, batch, scores=True)
    assert rt.gen is not None and rt.gen.seen == NEW - 1  # the prefill kept a layout; every decoding step used it
    fresh, fresh_scores = _generate(model, batch, use_cache=False, scores=True)
    assert torch.equal(cached, fresh)
    for a, b in zip(cached_scores or [], fresh_scores or []):
        finite = torch.isfinite(a) & torch.isfinite(b)
        assert (a[finite] - b[finite]).abs().max().item() <= 1e-4
    with torch.no_grad():  # it did trim: the prefill's logits differ from the untrimmed model's
        assert (_forward(model, batch) - _forward(bb.model, batch)).abs().max().item() > 1e-3
    rt.remove()


@pytest.mark.parametrize("ref", MODELS, ids=_ids)
def test_save_load_generate_is_exact(ref, tmp_path):
    import trimkit
    from trimkit.io import base_writer, save_folder

    bb, inputs = _setup(ref)
    model = _trimmed(ref, threshold=0.5)
    _spread(model, inputs, seed=1)
    save_folder(tmp_path / "m", base_ref=ref, model=model, base_model_dir_writer=base_writer(bb.model))
    loaded = trimkit.load(str(tmp_path / "m")).model
    with torch.no_grad():
        assert torch.equal(_forward(model, inputs), _forward(loaded, inputs))
    assert torch.equal(_generate(model, inputs), _generate(loaded, inputs))


def test_training_forward_relaxes_and_reaches_the_trimmers():
    from trimkit.cost import cost_model, expected_ratio

    bb, inputs = _setup("llava-tiny")
    model = _trimmed("llava-tiny", threshold=0.5)
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


def test_stats_outlive_decoding():
    bb, inputs = _setup("llava-tiny")
    model = _trimmed("llava-tiny", threshold=0.5)
    _spread(model, inputs)
    _generate(model, inputs)
    stats = trim_stats(model)["tokens"]["model.language_model.layers"]
    assert stats["length"] == 24 and len(stats["kept"]) == 3
    set_threshold(model, 0.0)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, bb.model(**inputs).logits)


def test_vision_tower_in_skip_mode_keeps_the_splice_aligned():
    bb, inputs = _setup("llava-tiny")
    model = _trimmed("llava-tiny", threshold=0.0, vision="skip")
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
    assert _generate(model, inputs).shape == (2, 24 + NEW)


def test_gather_seq_follows_the_batch_dim_of_mrope_ids():
    from trimkit.runtime.decoder import gather_seq

    ids = torch.arange(3 * 2 * 5).view(3, 2, 5)
    index = torch.tensor([[0, 2], [1, 4]])
    got = gather_seq(ids, index, 2)
    assert got.shape == (3, 2, 2)
    assert got[:, 0].tolist() == ids[:, 0, [0, 2]].tolist() and got[:, 1].tolist() == ids[:, 1, [1, 4]].tolist()
    cos = torch.randn(1, 5, 4)
    assert torch.equal(gather_seq(cos, index, 1)[1], cos[0, [1, 4]])


def test_two_images_anywhere_in_the_prompt():
    bb, _ = _setup("llava-tiny")
    image, n = bb.model.config.image_token_index, 16
    g = torch.Generator().manual_seed(3)

    def text(k):
        return torch.randint(3, 100, (k,), generator=g).tolist()

    rows = [[1] + text(3) + [image] * n + text(2) + [image] * n + text(3),
            [1] + [image] * n + text(5) + [image] * n + text(3)]
    ids = torch.tensor(rows)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(4, 3, 32, 32, generator=g)}
    span = locate(bb.model, inputs, hints=bb.hints).image_span
    assert span["positions"] == [(ids[i] == image).nonzero().view(-1).tolist() for i in range(2)]
    model = copy.deepcopy(bb.model)
    apply_(model, SmartTrimTokensConfig(threshold=0.0), inputs=inputs, hints=bb.hints)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, bb.model(**inputs).logits)
        set_threshold(model, 1.0)
        model(**inputs)
    assert trim_stats(model)["tokens"]["model.language_model.layers"]["kept"] == [9.0, 9.0, 9.0]


def test_head_trimming_leaves_a_decoder_language_model_whole_so_generation_works():
    from trimkit.passes.smarttrim_heads import SmartTrimHeadsConfig

    bb, inputs = _setup("llava-tiny")
    model = copy.deepcopy(bb.model)
    report = apply_(model, [SmartTrimTokensConfig(threshold=0.5), SmartTrimHeadsConfig(threshold=0.5)],
                    inputs=inputs, hints=bb.hints).results[1].report
    assert report["trimmed_sites"] and not any(p.startswith("model.language_model.") for p in report["trimmed_sites"])
    assert any("KV cache" in why for p, why in report["skipped_sites"].items() if p.startswith("model.language_model."))
    _spread(model, inputs)
    assert _generate(model, inputs).shape == (2, 24 + NEW)


def test_decoding_after_trimming_the_first_lm_layer_is_refused_clearly():
    from trimkit.errors import TrimkitError

    bb, inputs = _setup("llava-tiny")
    model = _trimmed("llava-tiny", threshold=0.5, decoder_start=0)
    _spread(model, inputs)
    with torch.no_grad():
        _forward(model, inputs)  # single forwards work
    with pytest.raises(TrimkitError, match="first layer"):
        _generate(model, inputs)
