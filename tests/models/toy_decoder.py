"""A plain-PyTorch decoder VLM, loaded as ``tests/models/toy_decoder.py:toy_decoder_factory``.

A vision encoder (patch embedding + pre-norm blocks), a projector, and a language model whose
input embeddings get the projected image features written at the image-placeholder positions
by index assignment (``embeds[image_mask] = feats``). Every attention is written here (no SDPA,
no ``nn.MultiheadAttention``). The language model is built as Hugging Face decoders are, with its
own code and names:

* ``ToyDecoderVLM.forward(input_ids, pixel_values=None, attention_mask=None, position_ids=None,
  past_key_values=None, use_cache=False) -> DecoderOutput`` (``.logits [B, L, vocab]``,
  ``.past_key_values``: a `ToyKVCache` when ``use_cache``, else None).
* Position ids default to ``cumsum(attention_mask) - 1`` (left padding), the last ``L`` of them
  when a cache holds earlier tokens (``attention_mask`` then covers cached + new tokens, as in HF).
* The mask is built once at the top, ``[B, 1, L, past + L]`` bool (True = attend: causal and not
  padding), and so is the rotary table ``(cos, sin)``, each ``[B, L, head_dim]``; every decoder
  layer is called as ``layer(hidden, mask, (cos, sin), past_key_values, layer_idx)``.
* `ToyKVCache` holds per-layer key/value tensors ``[B, kv_heads, T, head_dim]``; each attention
  appends its new keys/values with ``cache.update(k, v, layer_idx)`` (concatenation).
* ``generate(input_ids, pixel_values=None, attention_mask=None, max_new_tokens=8, use_cache=True)``:
  greedy (never the image placeholder), left padding supported, returns prompt + new tokens
  ``[B, L + max_new_tokens]``.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class ToyDecoderConfig:
    image: int = 32
    patch: int = 8
    v_width: int = 32
    v_layers: int = 2
    v_heads: int = 2
    v_ffn: int = 96
    vocab: int = 96
    width: int = 48
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    rope_theta: float = 10000.0
    pad_id: int = 0
    bos_id: int = 1
    image_id: int = 95
    text_len: int = 6

    @property
    def image_tokens(self) -> int:
        return (self.image // self.patch) ** 2


class DecoderOutput(dict):
    """``logits`` and ``past_key_values``, readable as keys or attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ToyKVCache:
    """Per-layer keys and values ``[B, kv_heads, T, head_dim]``, grown by concatenation."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[2] if layer_idx < len(self.keys) else 0


# ---- vision ------------------------------------------------------------------------------------

class VisionAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5).softmax(dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, d))


class VisionBlock(nn.Module):
    def __init__(self, width: int, heads: int, ffn: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = VisionAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Linear(ffn, width))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: ToyDecoderConfig):
        super().__init__()
        self.patch = nn.Conv2d(3, cfg.v_width, cfg.patch, stride=cfg.patch)
        self.pos = nn.Parameter(torch.randn(1, cfg.image_tokens, cfg.v_width) * 0.02)
        self.blocks = nn.ModuleList(VisionBlock(cfg.v_width, cfg.v_heads, cfg.v_ffn) for _ in range(cfg.v_layers))
        self.norm = nn.LayerNorm(cfg.v_width)

    def forward(self, pixels):
        x = self.patch(pixels).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# ---- language model ----------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def rotary_table(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each ``[B, L, head_dim]``, of integer positions ``[B, L]``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq.to(position_ids.device)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def attention_mask_4d(attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """``[B, 1, Lq, Lk]`` bool, True = attend: key j is not padding and not after query i.

    `attention_mask` ``[B, Lk]`` covers cached and new tokens; the queries are its last `query_len`.
    """
    key_len = attention_mask.shape[1]
    q_abs = torch.arange(key_len - query_len, key_len, device=attention_mask.device)
    causal = torch.arange(key_len, device=attention_mask.device)[None, :] <= q_abs[:, None]
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


class DecoderAttention(nn.Module):
    def __init__(self, cfg: ToyDecoderConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.width // cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.heads * self.head_dim)
        self.k_proj = nn.Linear(cfg.width, cfg.kv_heads * self.head_dim)
        self.v_proj = nn.Linear(cfg.width, cfg.kv_heads * self.head_dim)
        self.o_proj = nn.Linear(cfg.heads * self.head_dim, cfg.width, bias=False)

    def forward(self, x, mask, rope, cache=None, layer_idx=0):
        b, n, _ = x.shape
        q = self.q_proj(x).reshape(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).reshape(b, n, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(b, n, -1, self.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in rope)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = q @ k.transpose(-1, -2) * self.head_dim ** -0.5
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        out = scores.softmax(dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class DecoderMLP(nn.Module):
    def __init__(self, width: int, ffn: int):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(width, ffn, bias=False), nn.Linear(width, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, width, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ToyDecoderConfig):
        super().__init__()
        self.input_norm, self.post_norm = RMSNorm(cfg.width), RMSNorm(cfg.width)
        self.self_attn = DecoderAttention(cfg)
        self.mlp = DecoderMLP(cfg.width, cfg.ffn)

    def forward(self, hidden, mask, rope, cache=None, layer_idx=0):
        hidden = hidden + self.self_attn(self.input_norm(hidden), mask, rope, cache, layer_idx)
        return hidden + self.mlp(self.post_norm(hidden))


class ToyDecoderVLM(nn.Module):
    def __init__(self, cfg: ToyDecoderConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ToyDecoderConfig()
        self.vision = VisionEncoder(cfg)
        self.projector = nn.Sequential(nn.Linear(cfg.v_width, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.width))
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def embed_inputs(self, input_ids, pixel_values=None):
        embeds = self.embed(input_ids)
        if pixel_values is None:
            return embeds
        feats = self.projector(self.vision(pixel_values))
        image_mask = input_ids == self.cfg.image_id
        if int(image_mask.sum()) != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"{int(image_mask.sum())} image tokens for {feats.shape[0] * feats.shape[1]} "
                             "image features")
        embeds = embeds.clone()
        embeds[image_mask] = feats.reshape(-1, feats.shape[-1]).to(embeds.dtype)
        return embeds

    def forward(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=False):
        past = past_key_values.length() if past_key_values is not None else 0
        b, n = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, past + n, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]
        cache = past_key_values if past_key_values is not None else (ToyKVCache() if use_cache else None)
        hidden = self.embed_inputs(input_ids, pixel_values)
        mask = attention_mask_4d(attention_mask, n)
        rope = rotary_table(position_ids, self.cfg.width // self.cfg.heads, self.cfg.rope_theta)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, mask, rope, cache, i)
        logits = self.lm_head(self.norm(hidden))
        return DecoderOutput(logits=logits, past_key_values=cache if use_cache else None)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=8, use_cache=True):
        """Greedy decoding: the prompt followed by `max_new_tokens` tokens ``[B, L + max_new_tokens]``."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        seq = input_ids
        out = self(input_ids, pixel_values, mask, use_cache=use_cache)
        for step in range(max_new_tokens):
            logits = out.logits[:, -1].clone()
            logits[:, self.cfg.image_id] = float("-inf")  # placeholders come with images only
            token = logits.argmax(-1, keepdim=True)
            seq, mask = torch.cat([seq, token], dim=1), torch.cat([mask, torch.ones_like(token)], dim=1)
            if step == max_new_tokens - 1:
                break
            if use_cache:
                out = self(token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
            else:
                out = self(seq, pixel_values, mask)
        return seq


def make_prompts(cfg: ToyDecoderConfig, text_lens: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded prompts ``[bos] + <image>*image_tokens + text`` of the given text lengths, and images."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in text_lens:
        body = torch.randint(cfg.bos_id + 1, cfg.image_id, (n,), generator=g)
        rows.append(torch.cat([torch.tensor([cfg.bos_id] + [cfg.image_id] * cfg.image_tokens), body]))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), cfg.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    pixels = torch.randn(len(rows), 3, cfg.image, cfg.image, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def toy_decoder_factory(cfg: ToyDecoderConfig | None = None):
    """(model, example inputs): two rows, the second left-padded."""
    cfg = cfg or ToyDecoderConfig()
    torch.manual_seed(0)
    model = ToyDecoderVLM(cfg).eval()
    return model, make_prompts(cfg, [cfg.text_len, cfg.text_len - 2])


factory = toy_decoder_factory
