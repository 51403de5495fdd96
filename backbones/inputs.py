"""Deterministic example inputs: random token ids and pixels, row i seeded by (seed, i).

`InputMaker` is the `make_inputs` of the registry families: a text part (``input_ids``,
``attention_mask``), an image part (``pixel_values`` and, for ViLT, ``pixel_mask``) and constant
extra ids (BLIP-VQA's ``decoder_input_ids``). `RepeatBatch` is the `make_inputs` of a user factory:
it repeats or slices one example batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from trimkit.errors import ConfigError

__all__ = ["TextSpec", "ImageSpec", "InputMaker", "RepeatBatch"]

TEXT_STREAM, IMAGE_STREAM, LABEL_STREAM = 1, 2, 3
RESIZE_MODES = ("interpolate_pos_encoding", "native")


def row_generator(seed: int, row: int, stream: int) -> torch.Generator:
    """The random generator of one row of one input stream: rows never depend on the batch size."""
    return torch.Generator().manual_seed(seed * 1_000_003 + row * 16 + stream)


@dataclass(frozen=True)
class TextSpec:
    """Token ids: ``[first_id] + [image_token]*image_tokens + body + [last_id]``.

    `text_len` counts every token except the image placeholders. Body ids are drawn uniformly
    from the vocabulary minus `reserved` (special ids). `max_len` is the longest text the model's
    position embeddings allow.
    """

    vocab_size: int
    max_len: int
    default_len: int = 8
    first_id: int | None = None
    last_id: int | None = None
    reserved: tuple[int, ...] = ()
    image_token_id: int | None = None
    image_tokens: int = 0

    @property
    def min_len(self) -> int:
        return 1 + (self.first_id is not None) + (self.last_id is not None)

    def check_len(self, text_len: int) -> int:
        if not isinstance(text_len, int) or not self.min_len <= text_len <= self.max_len:
            raise ConfigError(f"text_len must be an int in [{self.min_len}, {self.max_len}], got {text_len!r}")
        return text_len

    def _body_ids(self) -> torch.Tensor:
        banned = set(self.reserved) | {self.first_id, self.last_id, self.image_token_id}
        allowed = [i for i in range(self.vocab_size) if i not in banned]
        return torch.tensor(allowed, dtype=torch.long)

    def row(self, text_len: int, generator: torch.Generator, body_ids: torch.Tensor) -> torch.Tensor:
        n_body = text_len - (self.first_id is not None) - (self.last_id is not None)
        body = body_ids[torch.randint(len(body_ids), (n_body,), generator=generator)]
        head = [] if self.first_id is None else [self.first_id]
        head += [self.image_token_id] * self.image_tokens if self.image_token_id is not None else []
        tail = [] if self.last_id is None else [self.last_id]
        return torch.cat([torch.tensor(head, dtype=torch.long), body, torch.tensor(tail, dtype=torch.long)])

    def make(self, batch_size: int, text_len: int | None, seed: int) -> dict[str, torch.Tensor]:
        text_len = self.check_len(self.default_len if text_len is None else text_len)
        body_ids = self._body_ids()
        rows = [self.row(text_len, row_generator(seed, r, TEXT_STREAM), body_ids) for r in range(batch_size)]
        ids = torch.stack(rows)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def hints(self) -> dict:
        positions = ([0] if self.first_id is not None else []) + ([-1] if self.last_id is not None else [])
        hints = {"text_len": {"default": self.default_len, "min": self.min_len, "max": self.max_len},
                 "special_tokens": {"text": positions}}
        if self.image_token_id is not None:
            hints.update(image_token_id=self.image_token_id, image_tokens=self.image_tokens)
        return hints


@dataclass(frozen=True)
class ImageSpec:
    """Square images of `size` pixels (the model's native size) cut in `patch`-pixel patches.

    resize: how other sizes are fed: ``"interpolate_pos_encoding"`` (the flag is passed when the
    size differs), ``"native"`` (the model accepts any multiple of the patch, e.g. ViLT) or None
    (a fixed-size vision tower: `image_size` is ignored and the native size is kept).
    cls_token: whether the vision sequence starts with a class token.
    """

    size: int
    patch: int
    resize: str | None = "interpolate_pos_encoding"
    channels: int = 3
    pixel_mask: bool = False
    cls_token: bool = True

    def __post_init__(self) -> None:
        if self.resize is not None and self.resize not in RESIZE_MODES:
            raise ConfigError(f"resize must be one of {RESIZE_MODES} or None, got {self.resize!r}")

    def check_size(self, image_size: int | None) -> int:
        if image_size is None or self.resize is None:
            return self.size
        if not isinstance(image_size, int) or image_size < self.patch or image_size % self.patch:
            raise ConfigError(
                f"image_size must be a positive multiple of the patch size {self.patch}, got {image_size!r}")
        return image_size

    def make(self, batch_size: int, image_size: int | None, seed: int) -> dict[str, Any]:
        size = self.check_size(image_size)
        shape = (self.channels, size, size)
        pixels = torch.stack([torch.randn(shape, generator=row_generator(seed, r, IMAGE_STREAM))
                              for r in range(batch_size)])
        inputs: dict[str, Any] = {"pixel_values": pixels}
        if self.pixel_mask:
            inputs["pixel_mask"] = torch.ones(batch_size, size, size, dtype=torch.long)
        if self.resize == "interpolate_pos_encoding" and size != self.size:
            inputs["interpolate_pos_encoding"] = True
        return inputs

    def hints(self) -> dict:
        return {"image_size": {"native": self.size, "patch": self.patch, "variable": self.resize is not None,
                               "via": self.resize},
                "special_tokens": {"vision": [0] if self.cls_token else []}}


@dataclass(frozen=True)
class InputMaker:
    """make_inputs for the registry families (see `Backbone`)."""

    text: TextSpec | None = None
    image: ImageSpec | None = None
    constants: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __call__(self, batch_size: int, *, text_len: int | None = None, image_size: int | None = None,
                 seed: int = 0) -> dict[str, Any]:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        inputs: dict[str, Any] = {}
        if self.image is not None:
            inputs.update(self.image.make(batch_size, image_size, seed))
        if self.text is not None:
            inputs.update(self.text.make(batch_size, text_len, seed))
        for key, ids in self.constants:
            inputs[key] = torch.tensor(ids, dtype=torch.long).expand(batch_size, -1).clone()
        return inputs

    def hints(self) -> dict:
        modalities: dict[str, str] = {}
        masks: dict[str, str] = {}
        special: dict[str, list[int]] = {}
        hints: dict[str, Any] = {}
        if self.image is not None:
            modalities["pixel_values"] = "vision"
            masks.update({"pixel_mask": "vision"} if self.image.pixel_mask else {})
            image_hints = self.image.hints()
            special.update(image_hints.pop("special_tokens"))
            hints.update(image_hints)
        if self.text is not None:
            modalities["input_ids"] = "text"
            masks["attention_mask"] = "text"
            text_hints = self.text.hints()
            special.update(text_hints.pop("special_tokens"))
            hints.update(text_hints)
        modalities.update({key: "text" for key, _ in self.constants})
        return {"modalities": modalities, "masks": masks, "special_tokens": special, **hints}


@dataclass(frozen=True)
class RepeatBatch:
    """make_inputs from one example batch: rows are repeated or sliced to the asked batch size.

    A tensor whose first dimension equals the example's batch size is indexed row-wise; anything
    else passes unchanged. text_len, image_size and seed are accepted and ignored.
    """

    example: Mapping[str, Any]

    @property
    def batch_size(self) -> int | None:
        sizes = [v.shape[0] for v in self.example.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        return sizes[0] if sizes else None

    def __call__(self, batch_size: int, *, text_len: int | None = None, image_size: int | None = None,
                 seed: int = 0) -> dict[str, Any]:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        base = self.batch_size
        if base is None:
            return dict(self.example)
        rows = torch.arange(batch_size) % base
        return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == base else v
                for k, v in self.example.items()}
