"""Deterministic example inputs: random token ids and pixels, row i seeded by (seed, i).

`InputMaker` is the `make_inputs` of the registry families: a text part (``input_ids``,
``attention_mask`` and, for Qwen2-VL, ``mm_token_type_ids``), an image part (``pixel_values`` and,
for ViLT, ``pixel_mask``; for Qwen2-VL flattened patches and ``image_grid_thw``) and constant
extra ids (BLIP-VQA's ``decoder_input_ids``). `RepeatBatch` is the `make_inputs` of a user factory:
it repeats or slices one example batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from trimkit.errors import ConfigError
from trimkit.rows import batch_size_of, take_rows

__all__ = ["TextSpec", "ImageSpec", "InputMaker", "RepeatBatch"]

TEXT_STREAM, IMAGE_STREAM, LABEL_STREAM = 1, 2, 3
RESIZE_MODES = ("interpolate_pos_encoding", "native")


def row_generator(seed: int, row: int, stream: int) -> torch.Generator:
    """The random generator of one row of one input stream: rows never depend on the batch size."""
    return torch.Generator().manual_seed(seed * 1_000_003 + row * 16 + stream)


@dataclass(frozen=True)
class TextSpec:
    """Token ids: ``[first_id] + [image_open_id] + [image_token]*image_tokens + [image_close_id] + body + [last_id]``.

    `text_len` counts every token except the image placeholders. Body ids are drawn uniformly
    from the vocabulary minus `reserved` (special ids). `max_len` is the longest text the model's
    position embeddings allow. `token_types`: the name of an extra input marking the image
    placeholders with 1 and every other token with 0 (Qwen2-VL's ``mm_token_type_ids``).
    """

    vocab_size: int
    max_len: int
    default_len: int = 8
    first_id: int | None = None
    last_id: int | None = None
    reserved: tuple[int, ...] = ()
    image_token_id: int | None = None
    image_tokens: int = 0
    image_open_id: int | None = None
    image_close_id: int | None = None
    token_types: str | None = None

    @property
    def specials(self) -> tuple[int, ...]:
        """The fixed ids of every row that are neither body nor placeholders, in order."""
        return tuple(i for i in (self.first_id, self.image_open_id, self.image_close_id, self.last_id)
                     if i is not None)

    @property
    def min_len(self) -> int:
        return 1 + len(self.specials)

    def check_len(self, text_len: int) -> int:
        if not isinstance(text_len, int) or not self.min_len <= text_len <= self.max_len:
            raise ConfigError(f"text_len must be an int in [{self.min_len}, {self.max_len}], got {text_len!r}")
        return text_len

    def _body_ids(self) -> torch.Tensor:
        banned = set(self.reserved) | set(self.specials) | {self.image_token_id}
        allowed = [i for i in range(self.vocab_size) if i not in banned]
        return torch.tensor(allowed, dtype=torch.long)

    def _head(self, image_tokens: int) -> list[int]:
        head = [] if self.first_id is None else [self.first_id]
        if self.image_token_id is None:
            return head
        return head + [i for i in (self.image_open_id,) if i is not None] + [self.image_token_id] * image_tokens \
            + [i for i in (self.image_close_id,) if i is not None]

    def row(self, text_len: int, generator: torch.Generator, body_ids: torch.Tensor,
            image_tokens: int | None = None) -> torch.Tensor:
        n_body = text_len - len(self.specials)
        body = body_ids[torch.randint(len(body_ids), (n_body,), generator=generator)]
        head = self._head(self.image_tokens if image_tokens is None else image_tokens)
        tail = [] if self.last_id is None else [self.last_id]
        return torch.cat([torch.tensor(head, dtype=torch.long), body, torch.tensor(tail, dtype=torch.long)])

    def make(self, batch_size: int, text_len: int | None, seed: int,
             image_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """`image_tokens` overrides the placeholder count (an image size that sets it)."""
        text_len = self.check_len(self.default_len if text_len is None else text_len)
        body_ids = self._body_ids()
        rows = [self.row(text_len, row_generator(seed, r, TEXT_STREAM), body_ids, image_tokens)
                for r in range(batch_size)]
        ids = torch.stack(rows)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.token_types is not None:
            inputs[self.token_types] = (ids == self.image_token_id).to(torch.int32)
        return inputs

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
    temporal_patch: when set, the images are fed as Qwen2-VL feeds them: every image's patches
    flattened to rows of ``channels * temporal_patch * patch * patch`` values (the image repeated
    along time), all rows of the batch stacked in ``pixel_values`` and each image's
    ``(t, h, w)`` patch grid in ``image_grid_thw``. `merge` patches per side become one language
    model token (`placeholders`).
    """

    size: int
    patch: int
    resize: str | None = "interpolate_pos_encoding"
    channels: int = 3
    pixel_mask: bool = False
    cls_token: bool = True
    temporal_patch: int | None = None
    merge: int = 1

    def __post_init__(self) -> None:
        if self.resize is not None and self.resize not in RESIZE_MODES:
            raise ConfigError(f"resize must be one of {RESIZE_MODES} or None, got {self.resize!r}")

    @property
    def step(self) -> int:
        """Image sizes must be multiples of this many pixels."""
        return self.patch * self.merge

    def check_size(self, image_size: int | None) -> int:
        if image_size is None or self.resize is None:
            return self.size
        if not isinstance(image_size, int) or image_size < self.step or image_size % self.step:
            merged = f" times the merge size {self.merge} ({self.step} px)" if self.merge > 1 else ""
            raise ConfigError(f"image_size must be a positive multiple of the patch size {self.patch}{merged}, "
                              f"got {image_size!r}")
        return image_size

    def placeholders(self, image_size: int | None) -> int | None:
        """Language model tokens per image of that size (None: the text spec's fixed count)."""
        if self.temporal_patch is None:
            return None
        return (self.check_size(image_size) // self.step) ** 2

    def _packed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One image ``[C, H, W]`` -> (patch rows ``[h*w, C*t*p*p]``, grid ``[1, h, w]``)."""
        c, p, m, t = self.channels, self.patch, self.merge, self.temporal_patch
        h, w = pixels.shape[1] // p, pixels.shape[2] // p
        frames = pixels.unsqueeze(0).expand(t, -1, -1, -1)  # [t, C, H, W]
        rows = frames.reshape(1, t, c, h // m, m, p, w // m, m, p)
        rows = rows.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # grid order: merge windows, then patches inside
        return rows.reshape(h * w, c * t * p * p), torch.tensor([1, h, w])

    def make(self, batch_size: int, image_size: int | None, seed: int) -> dict[str, Any]:
        size = self.check_size(image_size)
        shape = (self.channels, size, size)
        if self.temporal_patch is not None:
            packed = [self._packed(torch.randn(shape, generator=row_generator(seed, r, IMAGE_STREAM)))
                      for r in range(batch_size)]
            return {"pixel_values": torch.cat([rows for rows, _ in packed]),
                    "image_grid_thw": torch.stack([grid for _, grid in packed])}
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
                               "via": self.resize, "step": self.step, "packed": self.temporal_patch is not None},
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
        image = {} if self.image is None else self.image.make(batch_size, image_size, seed)
        text = {}
        if self.text is not None:
            placeholders = None if self.image is None else self.image.placeholders(image_size)
            text = self.text.make(batch_size, text_len, seed, placeholders)
        # packed patches have no batch dimension: the inputs that have one come first
        inputs: dict[str, Any] = {**text, **image} if "image_grid_thw" in image else {**image, **text}
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

    A tensor whose first dimension equals the example's batch size is indexed row-wise, packed
    image patches image-wise (`trimkit.rows.take_rows`); anything else passes unchanged. text_len, image_size and seed are accepted and ignored.
    """

    example: Mapping[str, Any]

    @property
    def batch_size(self) -> int | None:
        if not any(isinstance(v, torch.Tensor) and v.dim() > 0 for v in self.example.values()):
            return None
        return batch_size_of(self.example)

    def __call__(self, batch_size: int, *, text_len: int | None = None, image_size: int | None = None,
                 seed: int = 0) -> dict[str, Any]:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        base = self.batch_size
        if base is None:
            return dict(self.example)
        return take_rows(self.example, torch.arange(batch_size) % base)
