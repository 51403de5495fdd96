"""The registry families: hub checkpoint, HF class, tiny config, input maker and task adapter.

Input makers and task adapters are built from a model's config, so a tiny model, a hub checkpoint
and a folder written by ``save_pretrained`` of the same class get the same treatment.

Tiny configs (random weights, built offline) keep the real class and wiring and shrink the sizes;
the streams differ in depth, heads and FFN width so that maps can tell them apart.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from trimkit.backbones.base import TaskAdapter
from trimkit.backbones.inputs import ImageSpec, InputMaker, TextSpec
from trimkit.runtime import state

__all__ = ["Family", "FAMILIES", "TINY_CONFIGS", "family_by_name", "family_by_architecture",
           "generic_inputs", "attach_decoder_logits"]

BERT_CLS, BERT_SEP, BERT_SPECIALS = 101, 102, (0, 100, 101, 102, 103)


@dataclass(frozen=True)
class Family:
    """One registry entry; `inputs` / `task` read a config of `architecture`, `prepare` fixes a model up."""

    name: str
    hub_id: str
    architecture: str
    tiny: Mapping[str, Any]
    inputs: Callable[[Any], InputMaker]
    task: Callable[[Any], TaskAdapter]
    prepare: Callable[[torch.nn.Module], None] | None = None


def _ids(*ids: int | None) -> tuple[int, ...]:
    return tuple(sorted({i for i in ids if i is not None}))


def _bert_cls(vocab_size: int, fallback: int | None) -> int | None:
    return BERT_CLS if vocab_size > BERT_SEP else fallback


# ---- BLIP ---------------------------------------------------------------------------------------

def _blip_image(config: Any) -> ImageSpec:
    vision = config.vision_config
    return ImageSpec(vision.image_size, vision.patch_size, "interpolate_pos_encoding")


def _blip_text(config: Any, *, decoder: bool) -> TextSpec:
    text = config.text_config
    first = text.bos_token_id if decoder else _bert_cls(text.vocab_size, text.bos_token_id)
    return TextSpec(text.vocab_size, text.max_position_embeddings, first_id=first, last_id=text.sep_token_id,
                    reserved=_ids(text.pad_token_id, text.bos_token_id, text.eos_token_id, text.sep_token_id))


def _blip_vqa_inputs(config: Any) -> InputMaker:
    return InputMaker(_blip_text(config, decoder=False), _blip_image(config),
                      constants=(("decoder_input_ids", (config.text_config.bos_token_id,)),))


def _stash_decoder_logits(module: torch.nn.Module, args: Any, output: Any) -> None:
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        state.put(module, state.DECODER_LOGITS, logits)


def _publish_decoder_logits(module: torch.nn.Module, args: Any, output: Any) -> None:
    logits = module.text_decoder.__dict__.pop(state.DECODER_LOGITS, None)
    if logits is not None and isinstance(output, Mapping):
        output["logits"] = logits


def attach_decoder_logits(model: torch.nn.Module) -> None:
    """Make BlipForQuestionAnswering return its answer decoder's token logits as ``outputs.logits``.

    In transformers 5 its forward returns only the loss and the image embeddings. Two forward hooks
    (on ``text_decoder`` and on the model) carry the decoder logits out; they read only the modules
    they are called with, so deep copies of the model keep working. Idempotent.
    """
    if state.get(model, state.LOGITS_HOOKS, False):
        return
    model.text_decoder.register_forward_hook(_stash_decoder_logits)
    model.register_forward_hook(_publish_decoder_logits)
    state.put(model, state.LOGITS_HOOKS, True)


# ---- BridgeTower, ViLT, CLIP, SigLIP, LLaVA -----------------------------------------------------

def _bridgetower_inputs(config: Any) -> InputMaker:
    text, vision = config.text_config, config.vision_config
    # RoBERTa positions start after the padding index.
    max_len = text.max_position_embeddings - (text.pad_token_id or 0) - 1
    return InputMaker(
        TextSpec(text.vocab_size, max_len, first_id=text.bos_token_id, last_id=text.eos_token_id,
                 reserved=_ids(text.pad_token_id, text.bos_token_id, text.eos_token_id)),
        ImageSpec(vision.image_size, vision.patch_size, "interpolate_pos_encoding"))


def _vilt_inputs(config: Any) -> InputMaker:
    # A small vocabulary (no BERT ids) may name its own first and last token ids in the config.
    cls = _bert_cls(config.vocab_size, getattr(config, "cls_token_id", None))
    sep = BERT_SEP if cls == BERT_CLS else getattr(config, "sep_token_id", None)
    return InputMaker(
        TextSpec(config.vocab_size, config.max_position_embeddings, first_id=cls,
                 last_id=sep if cls is not None else None,
                 reserved=_ids(config.pad_token_id, *(i for i in BERT_SPECIALS if i < config.vocab_size))),
        ImageSpec(config.image_size, config.patch_size, "native", pixel_mask=True))


def _clip_inputs(config: Any) -> InputMaker:
    text, vision = config.text_config, config.vision_config
    first, last = text.bos_token_id, text.eos_token_id
    if last == 2:  # legacy configs: CLIP pools at the largest id, the real end-of-text token
        first, last = text.vocab_size - 2, text.vocab_size - 1
    return InputMaker(
        TextSpec(text.vocab_size, text.max_position_embeddings, first_id=first, last_id=last,
                 reserved=_ids(text.pad_token_id, first, last)),
        ImageSpec(vision.image_size, vision.patch_size, "interpolate_pos_encoding"))


def _siglip_inputs(config: Any) -> InputMaker:
    text, vision = config.text_config, config.vision_config
    return InputMaker(
        TextSpec(text.vocab_size, text.max_position_embeddings, last_id=text.eos_token_id,
                 reserved=_ids(text.pad_token_id, text.bos_token_id, text.eos_token_id)),
        ImageSpec(vision.image_size, vision.patch_size, "interpolate_pos_encoding", cls_token=False))


def _llava_image_tokens(config: Any) -> int:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (config.vision_feature_select_strategy == "full")


def _llava_inputs(config: Any) -> InputMaker:
    text, vision = config.text_config, config.vision_config
    n_image = _llava_image_tokens(config)
    return InputMaker(
        TextSpec(text.vocab_size, text.max_position_embeddings - n_image, first_id=text.bos_token_id,
                 reserved=_ids(text.pad_token_id, text.bos_token_id, text.eos_token_id),
                 image_token_id=config.image_token_index, image_tokens=n_image),
        ImageSpec(vision.image_size, vision.patch_size, resize=None))


def _llava_task(config: Any) -> TaskAdapter:
    return TaskAdapter("lm", ignore_ids=_ids(config.image_token_index, config.text_config.pad_token_id))


# ---- Qwen2-VL -----------------------------------------------------------------------------------

QWEN2_VL_IMAGE_SIZE = 448  # the hub checkpoints take any multiple of 28 px; the tiny config sets 112


def _qwen2_vl_inputs(config: Any) -> InputMaker:
    text, vision = config.text_config, config.vision_config
    image = ImageSpec(getattr(vision, "image_size", QWEN2_VL_IMAGE_SIZE), vision.patch_size, "native",
                      channels=vision.in_channels, cls_token=False, temporal_patch=vision.temporal_patch_size,
                      merge=vision.spatial_merge_size)
    n_image = image.placeholders(None)
    eos = text.eos_token_id if isinstance(text.eos_token_id, list) else [text.eos_token_id]
    return InputMaker(
        TextSpec(text.vocab_size, text.max_position_embeddings - n_image, first_id=None,
                 reserved=_ids(text.pad_token_id, text.bos_token_id, *eos, config.video_token_id),
                 image_token_id=config.image_token_id, image_tokens=n_image,
                 image_open_id=config.vision_start_token_id, image_close_id=config.vision_end_token_id,
                 token_types="mm_token_type_ids"),
        image)


def _qwen2_vl_task(config: Any) -> TaskAdapter:
    return TaskAdapter("lm", ignore_ids=_ids(config.image_token_id, config.text_config.pad_token_id))


# ---- tiny configs -------------------------------------------------------------------------------

_BLIP_TINY = {
    "text_config": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, projection_dim=16,
                        bos_token_id=126, pad_token_id=0, sep_token_id=102, eos_token_id=2),
    # BLIP-VQA's answer decoder cross-attends to the question encoder with keys sized like the
    # vision tower, so the two widths must agree.
    "vision_config": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                          image_size=32, patch_size=8, projection_dim=16),
    "projection_dim": 16,
    "image_text_hidden_size": 16,
}

_TINY: dict[str, dict] = {
    "blip-vqa": _BLIP_TINY,
    "blip-itm": _BLIP_TINY,
    "blip-caption": _BLIP_TINY,
    "bridgetower-itm": {
        "text_config": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=64,
                            pad_token_id=1, bos_token_id=0, eos_token_id=2),
        # The vision tower has hidden_size // 64 heads and a 4x FFN; it needs as many layers as the text.
        "vision_config": dict(hidden_size=128, num_hidden_layers=3, image_size=32, patch_size=8),
        # Two cross-modal layers per side (built from text_config): layer 0 reads the output of
        # text/vision layer 1, layer 1 reads layer 2 through the link towers.
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
    },
    "vilt-vqa": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=40, image_size=32, patch_size=8,
                     num_labels=10),
    "clip": {
        "text_config": dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=32, projection_dim=16,
                            pad_token_id=1, bos_token_id=126, eos_token_id=127),
        "vision_config": dict(hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16),
        "projection_dim": 16,
    },
    "siglip": {
        "text_config": dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=32, projection_size=32,
                            pad_token_id=1, bos_token_id=126, eos_token_id=127),
        "vision_config": dict(hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                              image_size=32, patch_size=8),
    },
    "llava": {
        "vision_config": dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=128,
                              num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8,
                              projection_dim=16),
        "text_config": dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                            use_cache=False),
        "image_token_index": 127,
        "image_seq_length": 16,
    },
    "qwen2-vl": {
        # 112 px images in 14 px patches: an 8x8 patch grid, merged 2x2 into 16 language-model tokens.
        "vision_config": dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=4, hidden_size=64, patch_size=14,
                              temporal_patch_size=2, spatial_merge_size=2, in_channels=3, image_size=112),
        # head_dim 16: M-RoPE splits its 8 frequencies into 2 temporal, 3 height and 3 width ones.
        "text_config": dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
                            bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=False),
        "vision_start_token_id": 150,
        "image_token_id": 151,
        "video_token_id": 152,
        "vision_end_token_id": 153,
    },
}


def _frozen(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    return value


def _thawed(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thawed(v) for k, v in value.items()}
    return copy.copy(value)


def tiny_kwargs(name: str) -> dict:
    """A fresh, mutable copy of the config keyword arguments of `name`'s tiny variant."""
    return _thawed(family_by_name(name).tiny)


TINY_CONFIGS: Mapping[str, Mapping[str, Any]] = MappingProxyType({f"{k}-tiny": _frozen(v) for k, v in _TINY.items()})

FAMILIES: tuple[Family, ...] = (
    Family("blip-vqa", "Salesforce/blip-vqa-base", "BlipForQuestionAnswering", TINY_CONFIGS["blip-vqa-tiny"],
           _blip_vqa_inputs,
           lambda c: TaskAdapter("classification", position=-1, num_labels=c.text_config.vocab_size),
           attach_decoder_logits),
    Family("blip-itm", "Salesforce/blip-itm-base-coco", "BlipForImageTextRetrieval", TINY_CONFIGS["blip-itm-tiny"],
           lambda c: InputMaker(_blip_text(c, decoder=False), _blip_image(c)),
           lambda c: TaskAdapter("matching", key="itm_score", num_labels=2)),
    Family("blip-caption", "Salesforce/blip-image-captioning-base", "BlipForConditionalGeneration",
           TINY_CONFIGS["blip-caption-tiny"],
           lambda c: InputMaker(_blip_text(c, decoder=True), _blip_image(c)),
           lambda c: TaskAdapter("lm", ignore_ids=_ids(c.text_config.pad_token_id))),
    Family("bridgetower-itm", "BridgeTower/bridgetower-base-itm-mlm", "BridgeTowerForImageAndTextRetrieval",
           TINY_CONFIGS["bridgetower-itm-tiny"], _bridgetower_inputs,
           lambda c: TaskAdapter("matching", num_labels=2)),
    Family("vilt-vqa", "dandelin/vilt-b32-finetuned-vqa", "ViltForQuestionAnswering", TINY_CONFIGS["vilt-vqa-tiny"],
           _vilt_inputs, lambda c: TaskAdapter("classification", num_labels=c.num_labels)),
    Family("clip", "openai/clip-vit-base-patch32", "CLIPModel", TINY_CONFIGS["clip-tiny"], _clip_inputs,
           lambda c: TaskAdapter("contrastive", key="logits_per_image", contrastive="softmax")),
    Family("siglip", "google/siglip-base-patch16-224", "SiglipModel", TINY_CONFIGS["siglip-tiny"], _siglip_inputs,
           lambda c: TaskAdapter("contrastive", key="logits_per_image", contrastive="sigmoid")),
    Family("llava", "llava-hf/llava-1.5-7b-hf", "LlavaForConditionalGeneration", TINY_CONFIGS["llava-tiny"],
           _llava_inputs, _llava_task),
    Family("qwen2-vl", "Qwen/Qwen2-VL-2B-Instruct", "Qwen2VLForConditionalGeneration",
           TINY_CONFIGS["qwen2-vl-tiny"], _qwen2_vl_inputs, _qwen2_vl_task),
)

_BY_NAME = {f.name: f for f in FAMILIES}
_BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES}


def family_by_name(name: str) -> Family:
    """The family of a registry name, with or without ``-tiny`` (KeyError when unknown)."""
    return _BY_NAME[name.removesuffix("-tiny")]


def family_by_architecture(architecture: str) -> Family | None:
    return _BY_ARCHITECTURE.get(architecture)


# ---- any other architecture ---------------------------------------------------------------------

def generic_inputs(config: Any) -> InputMaker | None:
    """Inputs read from a config that names a vocabulary and/or an image size (None when neither)."""
    text_cfg = getattr(config, "text_config", None) or config
    vision_cfg = getattr(config, "vision_config", None) or config
    text = image = None
    vocab, max_len = getattr(text_cfg, "vocab_size", None), getattr(text_cfg, "max_position_embeddings", None)
    if isinstance(vocab, int) and isinstance(max_len, int):
        bos, eos = getattr(text_cfg, "bos_token_id", None), getattr(text_cfg, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        text = TextSpec(vocab, max_len, first_id=bos if isinstance(bos, int) and bos < vocab else None,
                        reserved=_ids(getattr(text_cfg, "pad_token_id", None), *eos))
    size, patch = getattr(vision_cfg, "image_size", None), getattr(vision_cfg, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int):
        image = ImageSpec(size, patch, resize=None, channels=getattr(vision_cfg, "num_channels", 3))
    if text is None and image is None:
        return None
    return InputMaker(text, image)
