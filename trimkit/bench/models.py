"""Bench models: small vision-language classifiers built from real Hugging Face classes.

Three families, each sized to a data set (vocabulary = the data set's tokenizer, one logit per
answer class), so they need no adaptation before training:

* ``blip`` -- BLIP/ALBEF-style: a `BlipVisionModel` (pre-LN ViT) and a `BlipTextModel` whose
  layers cross-attend to the image tokens; an MLP head on the text ``[CLS]`` output.
* ``bridgetower`` -- `BridgeTowerModel` (the METER stand-in: a RoBERTa text tower, a CLIP
  vision tower and co-attention layers fed through bridges); an MLP head on its pooled output.
* ``vilt`` -- `ViltForQuestionAnswering`: one fused pre-LN stream over text and patch tokens.

Every model takes ``pixel_values``, ``input_ids`` and ``attention_mask`` (the keys of
:func:`trimkit.data.collate`) and returns a `BenchOutput` whose ``logits`` are ``[B, num_labels]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import (BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel, BridgeTowerConfig,
                          BridgeTowerModel, ViltConfig, ViltForQuestionAnswering)
from transformers.utils import ModelOutput

from trimkit.errors import ConfigError

__all__ = ["FAMILIES", "ModelConfig", "BenchOutput", "BlipClassifier", "BridgeTowerClassifier",
           "ViltClassifier", "build_model", "model_config", "param_count"]

FAMILIES: tuple[str, ...] = ("blip", "bridgetower", "vilt")
POS_INITS: tuple[str, ...] = ("normal", "sincos")

# Token ids of trimkit.data.WordTokenizer.
PAD_ID, CLS_ID, SEP_ID = 0, 1, 2


@dataclass(frozen=True)
class ModelConfig:
    """The size of a bench model.

    hidden: width of every stream; layers: transformer layers per stream (BridgeTower: the text
    and vision towers each, with ``cross_layers`` co-attention layers on the last ones); heads:
    attention heads (BridgeTower's vision tower has ``hidden // 64`` by construction); mlp: FFN
    expansion; image / patch: image side and patch size in pixels; vocab_size / num_labels /
    max_text_len: from the data set; pos_init: how position embeddings start, ``normal`` (truncated
    normal like every other weight) or ``sincos`` (a fixed 2-D sine-cosine table of the patch grid
    for image tokens and a 1-D table for text positions; they stay trainable).
    """

    family: str
    vocab_size: int
    num_labels: int
    max_text_len: int = 16
    image: int = 64
    patch: int = 8
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    mlp: int = 4
    cross_layers: int = 2
    dropout: float = 0.0
    pos_init: str = "normal"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown bench family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.image % self.patch:
            raise ConfigError(f"image size {self.image} is not a multiple of the patch size {self.patch}")
        if self.pos_init not in POS_INITS:
            raise ConfigError(f"unknown pos_init {self.pos_init!r}; known: {', '.join(POS_INITS)}")
        if self.pos_init == "sincos" and self.hidden % 4:
            raise ConfigError(f"pos_init 'sincos' needs hidden % 4 == 0, got {self.hidden}")
        if self.hidden % self.heads:
            raise ConfigError(f"hidden size {self.hidden} is not a multiple of the head count {self.heads}")
        if self.family == "bridgetower":
            if self.hidden % 64:
                raise ConfigError(f"BridgeTower's vision tower needs hidden % 64 == 0, got {self.hidden}")
            if not 1 <= self.cross_layers <= self.layers:
                raise ConfigError(f"cross_layers must be in 1..{self.layers}, got {self.cross_layers}")

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["pos_init"] == "normal":  # cache keys of models from before the field stay valid
            del data["pos_init"]
        return data


def model_config(family: str, dataset: Any, **overrides: Any) -> ModelConfig:
    """A `ModelConfig` of `family` sized to `dataset` (a `trimkit.data.VLDataset`)."""
    return ModelConfig(family=family, vocab_size=dataset.vocab_size, num_labels=dataset.num_labels,
                       max_text_len=dataset.max_text_len, image=dataset.image_size, **overrides)


@dataclass
class BenchOutput(ModelOutput):
    """``logits`` ``[B, num_labels]``."""

    logits: torch.Tensor | None = None


def _head(width: int, num_labels: int) -> nn.Sequential:
    """The VQA head of ViLT / ALBEF: Linear -> LayerNorm -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(),
                         nn.Linear(2 * width, num_labels))


class BlipClassifier(nn.Module):
    """BLIP vision encoder + BLIP text encoder with cross-attention to the image + MLP head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.config = c
        vision = BlipVisionConfig(hidden_size=c.hidden, intermediate_size=c.mlp * c.hidden,
                                  num_hidden_layers=c.layers, num_attention_heads=c.heads, image_size=c.image,
                                  patch_size=c.patch, attention_dropout=c.dropout)
        text = BlipTextConfig(vocab_size=c.vocab_size, hidden_size=c.hidden, encoder_hidden_size=c.hidden,
                              intermediate_size=c.mlp * c.hidden, num_hidden_layers=c.layers,
                              num_attention_heads=c.heads, max_position_embeddings=c.max_text_len,
                              hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout,
                              pad_token_id=PAD_ID, bos_token_id=CLS_ID, sep_token_id=SEP_ID, eos_token_id=SEP_ID,
                              is_decoder=True)  # is_decoder builds the cross-attention; the forward is bidirectional
        self.vision_model = BlipVisionModel(vision)
        self.text_encoder = BlipTextModel(text, add_pooling_layer=False)
        self.classifier = _head(c.hidden, c.num_labels)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, interpolate_pos_encoding: bool = False) -> BenchOutput:
        image = self.vision_model(pixel_values=pixel_values,
                                  interpolate_pos_encoding=interpolate_pos_encoding).last_hidden_state
        image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                                 encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state
        return BenchOutput(logits=self.classifier(text[:, 0]))


class BridgeTowerClassifier(nn.Module):
    """`BridgeTowerModel` + MLP head on its pooled output (text and image [CLS], concatenated)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.config = c
        hf = BridgeTowerConfig(
            text_config=dict(vocab_size=c.vocab_size, hidden_size=c.hidden, intermediate_size=c.mlp * c.hidden,
                             num_hidden_layers=c.layers, num_attention_heads=c.heads,
                             max_position_embeddings=c.max_text_len + 2, hidden_dropout_prob=c.dropout,
                             attention_probs_dropout_prob=c.dropout,
                             pad_token_id=PAD_ID, bos_token_id=CLS_ID, eos_token_id=SEP_ID),
            vision_config=dict(hidden_size=c.hidden, num_hidden_layers=c.layers, image_size=c.image,
                               patch_size=c.patch),
            hidden_size=c.hidden, num_attention_heads=c.heads, num_hidden_layers=c.cross_layers,
            hidden_dropout_prob=c.dropout)
        self.bridgetower = BridgeTowerModel(hf)
        self.classifier = _head(2 * c.hidden, c.num_labels)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, interpolate_pos_encoding: bool = False) -> BenchOutput:
        out = self.bridgetower(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                               interpolate_pos_encoding=interpolate_pos_encoding)
        return BenchOutput(logits=self.classifier(out.pooler_output))


class ViltClassifier(nn.Module):
    """`ViltForQuestionAnswering` with one output per answer class."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.config = c
        hf = ViltConfig(vocab_size=c.vocab_size, hidden_size=c.hidden, num_hidden_layers=c.layers,
                        num_attention_heads=c.heads, intermediate_size=c.mlp * c.hidden,
                        max_position_embeddings=c.max_text_len, image_size=c.image, patch_size=c.patch,
                        hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout,
                        num_labels=c.num_labels, pad_token_id=PAD_ID)
        self.vilt = ViltForQuestionAnswering(hf)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, pixel_mask: torch.Tensor | None = None) -> BenchOutput:
        out = self.vilt(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                        pixel_mask=pixel_mask)
        return BenchOutput(logits=out.logits)


_CLASSES: dict[str, type[nn.Module]] = {"blip": BlipClassifier, "bridgetower": BridgeTowerClassifier,
                                        "vilt": ViltClassifier}


def _init_weights(module: nn.Module, std: float) -> None:
    """Truncated-normal Linear/Embedding weights, zero biases, unit LayerNorms (ViT/BERT init)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if p.dim() == 1 and ("class_embedding" in name or "cls_token" in name):
            nn.init.trunc_normal_(p, std=std)
        elif "position_embedding" in name and p.dim() >= 2 and p.shape[-1] != 0:
            nn.init.trunc_normal_(p, std=std)


def sincos_1d(positions: int, dim: int) -> torch.Tensor:
    """``[positions, dim]``: sines of ``dim / 2`` geometric frequencies, then their cosines."""
    freq = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angle = torch.arange(positions, dtype=torch.float64)[:, None] * freq[None]
    return torch.cat([angle.sin(), angle.cos()], dim=1).float()


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """``[side * side, dim]`` in row-major patch order: half the channels encode the row, half the
    column."""
    rows, cols = sincos_1d(side, dim // 2), sincos_1d(side, dim // 2)
    return torch.cat([rows[:, None].expand(side, side, -1), cols[None].expand(side, side, -1)], -1).reshape(
        side * side, dim)


@torch.no_grad()
def _init_positions(model: nn.Module, config: ModelConfig) -> None:
    """Sine-cosine starts for the position embeddings: 2-D over the patch grid for image tokens
    (the class token's row stays zero), 1-D for text positions."""
    side = config.image // config.patch
    for name, p in model.named_parameters():
        if "position_embedding" not in name or p.dim() < 2:
            continue
        table = p.view(-1, p.shape[-1])
        if table.shape[0] == side * side + 1:  # image: [CLS] then the patch grid
            table[0].zero_()
            table[1:].copy_(sincos_2d(side, table.shape[1]))
        else:
            table.copy_(sincos_1d(table.shape[0], table.shape[1]))


def build_model(config: ModelConfig, *, seed: int = 0, init_std: float = 0.02) -> nn.Module:
    """A freshly initialised bench model of `config` (deterministic by `seed`), in train mode."""
    if not isinstance(config, ModelConfig):
        raise ConfigError(f"build_model needs a ModelConfig, got {type(config).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _CLASSES[config.family](config)
        _init_weights(model, init_std)
        if config.pos_init == "sincos":
            _init_positions(model, config)
    return model.train()


def param_count(model: nn.Module) -> int:
    """Number of parameters of `model`."""
    return sum(p.numel() for p in model.parameters())
