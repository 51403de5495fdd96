"""The dispatch counter against hand formulas on real HF blocks and torch modules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings, strategies as st
from torch import nn

from trimkit.profile import count_flops

REL = 1e-9  # the counts are exact; the contract only asks for 1%


def vit_block_flops(n: int, d: int, i: int) -> int:
    """Pre-LN ViT block per sample: QKV + scores + AV + out projection + 2 FFN linears."""
    return 3 * 2 * n * d * d + 2 * n * n * d + 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * i


def bert_block_flops(lq: int, le: int, d: int, i: int) -> int:
    """BERT decoder block: self-attention, cross-attention to `le` encoder tokens, FFN."""
    self_att = 8 * lq * d * d + 4 * lq * lq * d
    cross = 2 * lq * d * d + 2 * 2 * le * d * d + 4 * lq * le * d + 2 * lq * d * d
    return self_att + cross + 4 * lq * d * i


def mha_flops(lq: int, lk: int, e: int) -> int:
    return 2 * e * e * (lq + 2 * lk) + 4 * lq * lk * e + 2 * lq * e * e


# --------------------------------------------------------------------------- ViT


def _vit_config(d=32, heads=4, inter=48, layers=2, image=32, patch=8):
    return transformers.ViTConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                  intermediate_size=inter, image_size=image, patch_size=patch,
                                  attn_implementation="sdpa")


def test_vit_block_sdpa_matches_formula():
    torch.manual_seed(0)
    cfg = _vit_config()
    block = transformers.models.vit.modeling_vit.ViTLayer(cfg).eval()
    x = torch.randn(3, 17, 32)
    report = count_flops(block, {"hidden_states": x})
    assert report.flops == pytest.approx(vit_block_flops(17, 32, 48), rel=REL)
    assert any("scaled_dot_product" in op for op in report.by_op)
    # per sample (L=17, d=32, F=48, 4 heads): two layer norms 5 each, five bias adds of width d, the
    # intermediate bias and GELU, two residual adds, softmax 5 + scale 1 per attention score
    L, d, F, h = 17, 32, 48, 4
    assert report.elementwise_flops == 2 * 5 * L * d + 5 * L * d + 2 * L * F + 2 * L * d + 6 * h * L * L


def vit_model_flops(image: int, patch: int, d: int, inter: int, layers: int) -> int:
    patches = (image // patch) ** 2
    n = patches + 1
    embed = 2 * d * 3 * patch * patch * patches
    pooler = 2 * d * d
    return embed + layers * vit_block_flops(n, d, inter) + pooler


@pytest.mark.parametrize("image", [32, 48])
def test_vit_image_size_changes_flops_as_the_formula_says(image):
    torch.manual_seed(0)
    model = transformers.ViTModel(_vit_config()).eval()
    pixels = torch.randn(1, 3, image, image)
    report = count_flops(model, {"pixel_values": pixels, "interpolate_pos_encoding": True})
    assert report.flops == pytest.approx(vit_model_flops(image, 8, 32, 48, 2), rel=REL)


# --------------------------------------------------------------------------- BERT with cross-attention


def _bert_layer(impl: str, d=32, heads=4, inter=40):
    cfg = transformers.BertConfig(hidden_size=d, num_attention_heads=heads, intermediate_size=inter,
                                  num_hidden_layers=1, is_decoder=True, add_cross_attention=True,
                                  vocab_size=50, attn_implementation=impl)
    return transformers.models.bert.modeling_bert.BertLayer(cfg, layer_idx=0).eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bert_block_with_cross_attention_matches_formula(impl):
    torch.manual_seed(0)
    layer = _bert_layer(impl)
    b, lq, le = 2, 7, 5
    inputs = {
        "hidden_states": torch.randn(b, lq, 32),
        "attention_mask": torch.zeros(b, 1, lq, lq),
        "encoder_hidden_states": torch.randn(b, le, 32),
        "encoder_attention_mask": torch.zeros(b, 1, lq, le),
    }
    report = count_flops(layer, inputs)
    assert report.flops == pytest.approx(bert_block_flops(lq, le, 32, 40), rel=REL)
    ops = " ".join(report.by_op)
    assert ("scaled_dot_product" in ops) == (impl == "sdpa")


@settings(max_examples=12, deadline=None)
@given(lq=st.integers(1, 12), le=st.integers(1, 12))
def test_bert_text_length_changes_flops_as_the_formula_says(lq, le):
    torch.manual_seed(0)
    layer = _bert_layer("sdpa")
    report = count_flops(layer, {"hidden_states": torch.randn(1, lq, 32),
                                 "encoder_hidden_states": torch.randn(1, le, 32)})
    assert report.flops == pytest.approx(bert_block_flops(lq, le, 32, 40), rel=REL)


def test_masks_do_not_change_attention_flops():
    layer = _bert_layer("sdpa")
    x, enc = torch.randn(1, 6, 32), torch.randn(1, 4, 32)
    mask = torch.zeros(1, 1, 6, 4)
    mask[..., 2:] = torch.finfo(torch.float32).min
    plain = count_flops(layer, {"hidden_states": x, "encoder_hidden_states": enc})
    masked = count_flops(layer, {"hidden_states": x, "encoder_hidden_states": enc,
                                 "encoder_attention_mask": mask})
    assert masked.flops == plain.flops
    assert masked.elementwise_flops > plain.elementwise_flops  # the mask add is elementwise work


# --------------------------------------------------------------------------- nn.MultiheadAttention


@settings(max_examples=20, deadline=None)
@given(heads=st.sampled_from([2, 4]), head_dim=st.integers(1, 6), length=st.integers(1, 9),
       batch=st.integers(1, 3))
def test_mha_fast_path_matches_formula(heads, head_dim, length, batch):
    """Self-attention, eval, no grad, even head count: torch runs _native_multi_head_attention."""
    torch.manual_seed(0)
    e = heads * head_dim
    mha = nn.MultiheadAttention(e, heads, batch_first=True).eval()
    x = torch.randn(batch, length, e)
    with torch.no_grad():
        report = count_flops(mha, (x, x, x))
    assert "aten._native_multi_head_attention" in report.by_op  # the fused kernel ran
    assert report.flops == pytest.approx(mha_flops(length, length, e), rel=REL)


@settings(max_examples=15, deadline=None)
@given(heads=st.integers(1, 4), head_dim=st.integers(1, 6), lq=st.integers(1, 9),
       lk=st.integers(1, 9), batch=st.integers(1, 3))
def test_mha_cross_attention_matches_formula(heads, head_dim, lq, lk, batch):
    torch.manual_seed(0)
    e = heads * head_dim
    mha = nn.MultiheadAttention(e, heads, batch_first=True).eval()
    q, kv = torch.randn(batch, lq, e), torch.randn(batch, lk, e)
    report = count_flops(mha, (q, kv, kv))
    assert report.flops == pytest.approx(mha_flops(lq, lk, e), rel=REL)


def test_mha_fast_path_with_mask_counts_full_product():
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(1, 6, 16)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[:, 4:] = True
    report = count_flops(mha, (x, x, x, None, True, mask))
    assert "aten._native_multi_head_attention" in report.by_op
    assert report.flops == mha_flops(6, 6, 16)


def test_transformer_encoder_layer_fast_path():
    layer = nn.TransformerEncoderLayer(16, 2, 24, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    report = count_flops(layer, (x,))
    assert "aten._transformer_encoder_layer_fwd" in report.by_op
    assert report.flops == mha_flops(5, 5, 16) + 2 * 2 * 5 * 16 * 24


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_encoder_with_padding_counts_only_real_tokens():
    """TransformerEncoder packs padded rows into a nested tensor: only real tokens execute."""
    layer = nn.TransformerEncoderLayer(16, 2, 24, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(2, 6, 16)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 3:] = True  # row 1 has 3 real tokens
    report = count_flops(encoder, {"src": x, "src_key_padding_mask": padding})

    def per_layer(n):
        return mha_flops(n, n, 16) + 2 * 2 * n * 16 * 24

    assert report.flops == 2 * (per_layer(6) + per_layer(3)) / 2


# --------------------------------------------------------------------------- SDPA kernels


class _Sdpa(nn.Module):
    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel

    def forward(self, q, k, v, mask=None):
        return self.kernel(q, k, v, mask)


def _sdpa_flops(b, h, lq, lk, e, ev):
    return 2 * b * h * lq * lk * (e + ev)


@pytest.mark.parametrize("kernel", [
    lambda q, k, v, m: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=m)[0],
    lambda q, k, v, m: torch.ops.aten._scaled_dot_product_attention_math(q, k, v, m)[0],
    lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
], ids=["flash_for_cpu", "math", "functional"])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_kernels(kernel, masked):
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4)
    mask = torch.zeros(5, 7) if masked else None
    with torch.no_grad():
        report = count_flops(_Sdpa(kernel), (q, k, v, mask))
    assert report.flops == _sdpa_flops(1, 2, 5, 7, 4, 4)


def test_sdpa_grouped_query_heads_count_query_heads():
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    kernel = _Sdpa(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    assert count_flops(kernel, (q, k, v)).flops == _sdpa_flops(1, 4, 5, 6, 8, 8)


def test_conv_and_bmm_forms():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x, a, b):
            return self.conv(x).sum() + torch.bmm(a, b).sum() + (a @ b.transpose(1, 2).transpose(1, 2)).sum()

    x, a, b = torch.randn(2, 3, 6, 6), torch.randn(2, 5, 4), torch.randn(2, 4, 3)
    report = count_flops(M(), (x, a, b))
    conv = 2 * 4 * 3 * 9 * 36
    assert report.flops == conv + 2 * (2 * 5 * 4 * 3)


@pytest.mark.filterwarnings("ignore")
def test_dynamic_int8_linear_counts_its_multiply_adds():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4))
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    report = count_flops(quantized, (torch.randn(2, 3, 8),))
    assert "quantized.linear_dynamic" in report.by_op
    assert report.flops == 2 * 3 * 8 * 4 + 2 * 3 * 4 * 4
