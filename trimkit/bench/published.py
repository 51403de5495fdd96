"""Published base configurations, built with random weights (no download), for speed measurements.

Speed depends on the shapes and on what is trimmed, not on the weights, so a model built from the
published checkpoint's sizes measures what that checkpoint would. The sizes are written here (they
are the ``config.json`` values of the hub checkpoints named in ``published``), because nothing can
be downloaded. ``layers`` cuts every stream to that many layers (BridgeTower's co-attention layers
in proportion); each layer keeps its published width, heads, FFN and token count.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
import transformers

from trimkit.backbones import Backbone, backbone_for_model
from trimkit.backbones.registry import tiny_config
from trimkit.errors import ConfigError

__all__ = ["PublishedModel", "PUBLISHED", "published_model"]

_BERT_BASE = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)


def _blip_layers(kw: dict, layers: int) -> None:
    kw["vision_config"]["num_hidden_layers"] = layers
    kw["text_config"]["num_hidden_layers"] = layers


def _vilt_layers(kw: dict, layers: int) -> None:
    kw["num_hidden_layers"] = layers


def _bridgetower_layers(kw: dict, layers: int) -> None:
    full = kw["text_config"]["num_hidden_layers"]
    kw["text_config"]["num_hidden_layers"] = kw["vision_config"]["num_hidden_layers"] = layers
    kw["num_hidden_layers"] = max(1, round(kw["num_hidden_layers"] * layers / full))


@dataclass(frozen=True)
class PublishedModel:
    """One published base model: the registry family that makes its inputs, its HF class and sizes."""

    name: str
    published: str  # the hub checkpoint whose sizes these are
    family: str  # registry family (input maker, task adapter); also the tiny variant's config
    architecture: str
    sizes: Mapping[str, Any]
    cut_layers: Callable[[dict, int], None]
    full_layers: int = 12
    text_len: int = 16

    def config_kwargs(self, layers: int | None = None) -> dict:
        kw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in self.sizes.items()}
        if layers is not None and layers != self.full_layers:
            if not 1 <= layers <= self.full_layers:
                raise ConfigError(f"{self.name}: layers must be in [1, {self.full_layers}], got {layers}")
            self.cut_layers(kw, layers)
        return kw

    def build(self, layers: int | None = None, *, seed: int = 0, tiny: bool = False) -> Backbone:
        """The model with random weights (seeded) as a Backbone; ``tiny`` builds the registry's tiny
        config of the same class instead (for tests)."""
        cls = getattr(transformers, self.architecture)
        config = tiny_config(self.family) if tiny else cls.config_class(**self.config_kwargs(layers))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config)
        return backbone_for_model(model.eval(), name=f"{self.name}-tiny" if tiny else self.name, source="registry")

    def describe(self, layers: int | None) -> dict:
        kw = self.config_kwargs(layers)
        return {"name": self.name, "published": self.published, "architecture": self.architecture,
                "layers": layers or self.full_layers, "full_layers": self.full_layers, "config": kw}


def _frozen(d: dict) -> Mapping:
    return MappingProxyType({k: MappingProxyType(v) if isinstance(v, dict) else v for k, v in d.items()})


PUBLISHED: Mapping[str, PublishedModel] = MappingProxyType({m.name: m for m in (
    PublishedModel(
        "blip-vqa-base", "Salesforce/blip-vqa-base", "blip-vqa", "BlipForQuestionAnswering",
        _frozen({"vision_config": dict(_BERT_BASE, image_size=384, patch_size=16),  # ViT-B/16, 577 tokens
                 "text_config": dict(_BERT_BASE, vocab_size=30524, max_position_embeddings=512,
                                     bos_token_id=30522, pad_token_id=0, sep_token_id=102)}),
        _blip_layers),
    PublishedModel(
        "vilt-b32", "dandelin/vilt-b32-finetuned-vqa", "vilt-vqa", "ViltForQuestionAnswering",
        _frozen(dict(_BERT_BASE, vocab_size=30522, max_position_embeddings=40, image_size=384, patch_size=32,
                     num_labels=3129)),  # 384 px: 144 patches + [CLS]
        _vilt_layers),
    PublishedModel(
        "bridgetower-base", "BridgeTower/bridgetower-base-itm-mlm", "bridgetower-itm",
        "BridgeTowerForImageAndTextRetrieval",
        _frozen({"text_config": dict(_BERT_BASE, vocab_size=50265, max_position_embeddings=514, pad_token_id=1,
                                     bos_token_id=0, eos_token_id=2),  # RoBERTa-base
                 "vision_config": dict(hidden_size=768, num_hidden_layers=12, image_size=288, patch_size=16),
                 "hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 6}),  # 6 cross layers
        _bridgetower_layers),
)})

_ALIASES = {"blip": "blip-vqa-base", "vilt": "vilt-b32", "bridgetower": "bridgetower-base"}


def published_model(name: str) -> PublishedModel:
    """A published model by name (``blip-vqa-base``, ``vilt-b32``, ``bridgetower-base``) or family
    (``blip``, ``vilt``, ``bridgetower``)."""
    got = PUBLISHED.get(_ALIASES.get(name, name))
    if got is None:
        raise ConfigError(f"unknown published model {name!r}; known: {', '.join(PUBLISHED)} "
                          f"(or {', '.join(_ALIASES)})")
    return got
