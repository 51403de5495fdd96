"""Plain-PyTorch vision-language models, loaded through ``path/file.py:factory`` references.

* ``two_stream``: a vision tower and a text tower; attention is one fused qkv Linear and einsum
  products; every text layer cross-attends to the vision tower's output (fused kv projection).
* ``single_stream``: image patches and text tokens concatenated into one sequence and run through
  ``nn.MultiheadAttention`` layers (its fused eval fast path).
* ``sequential``: an ``nn.Sequential`` (patch embedding, blocks, head) over pixels alone.
* ``child_loop``: one fused sequence whose forward runs every child after the embedding in turn.

* ``encoder_layers``: the same single sequence through ``nn.TransformerEncoderLayer`` blocks, which run
  their fused kernel (``aten._transformer_encoder_layer_fwd``) in eval without grad.
* ``shared_cross``: a vision and a text stream exchanging information in co-attention layers whose ONE
  cross-attention module is called twice, text -> vision and vision -> text.

``sequential`` and ``child_loop`` call every child they hold, so whatever is attached to them runs too.

Argument names are deliberately not the Hugging Face ones.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    image: int = 32
    patch: int = 8
    vocab: int = 64
    text_len: int = 7
    v_width: int = 48
    v_layers: int = 2
    v_heads: int = 3
    v_ffn: int = 96
    t_width: int = 32
    t_layers: int = 3
    t_heads: int = 2
    t_ffn: int = 128
    classes: int = 5


class EinsumAttention(nn.Module):
    """Multi-head attention with a fused qkv projection (self) or q + fused kv (cross)."""

    def __init__(self, width: int, heads: int, kv_width: int | None = None):
        super().__init__()
        self.heads, self.cross = heads, kv_width is not None
        if self.cross:
            self.to_q = nn.Linear(width, width)
            self.to_kv = nn.Linear(kv_width, 2 * width)
        else:
            self.to_qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, context=None, key_mask=None):
        b, n, d = x.shape
        h = self.heads
        if self.cross:
            q = self.to_q(x)
            k, v = self.to_kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], h, d // h) for t in (q, k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (d // h) ** -0.5
        if key_mask is not None:
            scores = scores + key_mask
        attn = scores.softmax(dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
        return self.proj(out)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, ffn: int, kv_width: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = EinsumAttention(width, heads)
        if kv_width is not None:
            self.norm_x = nn.LayerNorm(width)
            self.xattn = EinsumAttention(width, heads, kv_width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Linear(ffn, width))

    def forward(self, x, context=None, key_mask=None):
        x = x + self.attn(self.norm1(x), key_mask=key_mask)
        if context is not None:
            x = x + self.xattn(self.norm_x(x), context)
        return x + self.mlp(self.norm2(x))


class TwoStreamVLM(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        n_patch = (cfg.image // cfg.patch) ** 2
        self.patchify = nn.Conv2d(3, cfg.v_width, cfg.patch, cfg.patch)
        self.v_cls = nn.Parameter(torch.randn(1, 1, cfg.v_width) * 0.02)
        self.v_pos = nn.Parameter(torch.randn(1, n_patch + 1, cfg.v_width) * 0.02)
        self.vision = nn.ModuleList(Block(cfg.v_width, cfg.v_heads, cfg.v_ffn) for _ in range(cfg.v_layers))
        self.v_norm = nn.LayerNorm(cfg.v_width)
        self.embed = nn.Embedding(cfg.vocab, cfg.t_width)
        self.t_pos = nn.Parameter(torch.randn(1, 64, cfg.t_width) * 0.02)
        self.text = nn.ModuleList(Block(cfg.t_width, cfg.t_heads, cfg.t_ffn, kv_width=cfg.v_width)
                                  for _ in range(cfg.t_layers))
        self.head = nn.Linear(cfg.t_width, cfg.classes)

    def forward(self, image, tokens):
        v = self.patchify(image).flatten(2).transpose(1, 2)
        v = torch.cat([self.v_cls.expand(v.shape[0], -1, -1), v], dim=1) + self.v_pos[:, : v.shape[1] + 1]
        for blk in self.vision:
            v = blk(v)
        v = self.v_norm(v)
        t = self.embed(tokens) + self.t_pos[:, : tokens.shape[1]]
        for blk in self.text:
            t = blk(t, context=v)
        return self.head(t[:, 0])


class MHABlock(nn.Module):
    def __init__(self, width: int, heads: int, ffn: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.mha = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, ffn), nn.ReLU(), nn.Linear(ffn, width))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.mha(h, h, h, need_weights=False)[0]
        return x + self.ff(self.ln2(x))


class SingleStreamVLM(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        n_patch = (cfg.image // cfg.patch) ** 2
        self.patch_proj = nn.Linear(3 * cfg.patch * cfg.patch, cfg.t_width)
        self.word = nn.Embedding(cfg.vocab, cfg.t_width)
        self.pos = nn.Parameter(torch.randn(1, n_patch + 64, cfg.t_width) * 0.02)
        self.segment = nn.Parameter(torch.randn(2, cfg.t_width) * 0.02)
        self.blocks = nn.ModuleList(MHABlock(cfg.t_width, cfg.t_heads, cfg.t_ffn) for _ in range(cfg.t_layers))
        self.norm = nn.LayerNorm(cfg.t_width)
        self.head = nn.Linear(cfg.t_width, cfg.classes)

    def forward(self, txt, img):
        p = self.cfg.patch
        b = img.shape[0]
        patches = img.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * p * p)
        x = torch.cat([self.word(txt) + self.segment[0], self.patch_proj(patches) + self.segment[1]], dim=1)
        x = x + self.pos[:, : x.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def make_inputs(cfg: ToyConfig, batch: int = 2, seed: int = 0, *, names=("image", "tokens")):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, cfg.image, cfg.image, generator=g)
    tokens = torch.randint(1, cfg.vocab, (batch, cfg.text_len), generator=g)
    tokens[:, 0] = 0  # [CLS]
    return {names[0]: image, names[1]: tokens}


def two_stream(cfg: ToyConfig | None = None):
    cfg = cfg or ToyConfig()
    torch.manual_seed(0)
    return TwoStreamVLM(cfg).eval(), make_inputs(cfg)


def single_stream(cfg: ToyConfig | None = None):
    cfg = cfg or ToyConfig()
    torch.manual_seed(0)
    model = SingleStreamVLM(cfg).eval()
    inputs = make_inputs(cfg, names=("img", "txt"))
    return model, {"txt": inputs["txt"], "img": inputs["img"]}


class PatchTokens(nn.Module):
    """Pixels → [CLS] + patch tokens with learned positions."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        n_patch = (cfg.image // cfg.patch) ** 2
        self.patchify = nn.Conv2d(3, cfg.v_width, cfg.patch, cfg.patch)
        self.cls = nn.Parameter(torch.randn(1, 1, cfg.v_width) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n_patch + 1, cfg.v_width) * 0.02)

    def forward(self, image):
        v = self.patchify(image).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(v.shape[0], -1, -1), v], dim=1) + self.pos[:, : v.shape[1] + 1]


class ClsHead(nn.Module):
    def __init__(self, width: int, classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.norm(x)[:, 0])


class FusedEmbedding(nn.Module):
    """Text tokens and image patches embedded into one sequence (text first)."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.patch = cfg.patch
        n_patch = (cfg.image // cfg.patch) ** 2
        self.patch_proj = nn.Linear(3 * cfg.patch * cfg.patch, cfg.t_width)
        self.word = nn.Embedding(cfg.vocab, cfg.t_width)
        self.pos = nn.Parameter(torch.randn(1, n_patch + 64, cfg.t_width) * 0.02)

    def forward(self, txt, img):
        p, b = self.patch, img.shape[0]
        patches = img.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * p * p)
        x = torch.cat([self.word(txt), self.patch_proj(patches)], dim=1)
        return x + self.pos[:, : x.shape[1]]


class ChildLoopVLM(nn.Module):
    """Embeds both inputs, then runs every other child in registration order."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.embed = FusedEmbedding(cfg)
        self.block0 = MHABlock(cfg.t_width, cfg.t_heads, cfg.t_ffn)
        self.block1 = Block(cfg.t_width, cfg.t_heads, cfg.t_ffn)
        self.block2 = MHABlock(cfg.t_width, cfg.t_heads, cfg.t_ffn)
        self.head = ClsHead(cfg.t_width, cfg.classes)

    def forward(self, txt, img):
        x = self.embed(txt, img)
        for child in list(self.children())[1:]:
            x = child(x)
        return x


def sequential(cfg: ToyConfig | None = None):
    """An ``nn.Sequential`` of patch embedding, blocks and head: it takes pixels only."""
    cfg = cfg or ToyConfig()
    torch.manual_seed(0)
    blocks = [Block(cfg.v_width, cfg.v_heads, cfg.v_ffn) for _ in range(3)]
    model = nn.Sequential(PatchTokens(cfg), *blocks, ClsHead(cfg.v_width, cfg.classes)).eval()
    return model, {"input": make_inputs(cfg)["image"]}


def child_loop(cfg: ToyConfig | None = None):
    cfg = cfg or ToyConfig()
    torch.manual_seed(0)
    inputs = make_inputs(cfg, names=("img", "txt"))
    return ChildLoopVLM(cfg).eval(), {"txt": inputs["txt"], "img": inputs["img"]}


class EncoderLayerVLM(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.embed = FusedEmbedding(cfg)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.t_width, cfg.t_heads, cfg.t_ffn, dropout=0.0, batch_first=True)
            for _ in range(cfg.t_layers))
        self.head = nn.Linear(cfg.t_width, cfg.classes)

    def forward(self, img, txt):
        x = self.embed(txt, img)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x[:, 0])


class CoBlock(nn.Module):
    """One layer of both streams: self-attention each, then the shared ``cross`` module both ways."""

    def __init__(self, width: int, heads: int, ffn: int):
        super().__init__()
        self.t_attn, self.v_attn = EinsumAttention(width, heads), EinsumAttention(width, heads)
        self.cross = EinsumAttention(width, heads, width)
        self.t_mlp = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Linear(ffn, width))
        self.v_mlp = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Linear(ffn, width))

    def forward(self, t, v):
        t, v = t + self.t_attn(t), v + self.v_attn(v)
        t, v = t + self.cross(t, v), v + self.cross(v, t)
        return t + self.t_mlp(t), v + self.v_mlp(v)


class SharedCrossVLM(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.patchify = nn.Conv2d(3, cfg.t_width, cfg.patch, cfg.patch)
        self.embed = nn.Embedding(cfg.vocab, cfg.t_width)
        self.layers = nn.ModuleList(CoBlock(cfg.t_width, cfg.t_heads, cfg.t_ffn) for _ in range(cfg.t_layers))
        self.head = nn.Linear(2 * cfg.t_width, cfg.classes)

    def forward(self, image, tokens):
        v = self.patchify(image).flatten(2).transpose(1, 2)
        t = self.embed(tokens)
        for layer in self.layers:
            t, v = layer(t, v)
        return self.head(torch.cat([t[:, 0], v.mean(1)], dim=-1))


def encoder_layers(cfg: ToyConfig | None = None):
    cfg = cfg or ToyConfig()
    torch.manual_seed(0)
    inputs = make_inputs(cfg, names=("img", "txt"))
    return EncoderLayerVLM(cfg).eval(), {"img": inputs["img"], "txt": inputs["txt"]}


def shared_cross(cfg: ToyConfig | None = None):
    cfg = cfg or ToyConfig()
    torch.manual_seed(0)
    return SharedCrossVLM(cfg).eval(), make_inputs(cfg)


def spread_trimmer_scores(model: nn.Module, seed: int = 1) -> None:
    """Give the token and head trimmers of `model` large random score weights, so their decisions
    differ from token to token and head to head (a fresh trimmer keeps almost everything)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.trimkit_token_trimmers.values():
            t.score.weight.copy_(torch.randn(t.score.weight.shape, generator=g) * 3)
        for t in model.trimkit_head_trimmers.values():
            t.fc2.weight.copy_(torch.randn(t.fc2.weight.shape, generator=g) * 3)
