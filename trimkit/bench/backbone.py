"""Bench models as trimkit backbones.

A `Backbone` made here reads its example inputs from the model's own data set (validation split
by default), so profiles and trimming decisions see real scenes and questions, not random ids.
The factory references that load them are in :mod:`trimkit.bench.factories`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from trimkit.backbones.base import Backbone, TaskAdapter
from trimkit.data import WordTokenizer, collate, itm_pairs, load_dataset
from trimkit.errors import ConfigError

__all__ = ["DataInputs", "bench_backbone", "bench_dataset"]


def bench_dataset(spec: str, task: str):
    """The data set of a canonical bench spec (retrieval: its image-text matching pairs)."""
    ds = load_dataset(spec)
    return itm_pairs(ds, seed=ds.spec.seed) if task == "retrieval" else ds


@lru_cache(maxsize=8)
def _cached_dataset(spec: str, task: str):
    return bench_dataset(spec, task)


@dataclass(frozen=True)
class DataInputs:
    """make_inputs from a data set: row ``i`` is item ``(seed * 7919 + i) % n``.

    text_len pads (``[PAD]``, mask 0) or truncates (keeping ``[SEP]`` last) every row to that
    length; image_size resizes the pixels (bilinear) and, with ``resize="interpolate_pos_encoding"``,
    passes that flag; ``pixel_mask`` adds an all-ones pixel mask (ViLT).
    """

    spec: str
    task: str
    patch: int
    native_image: int
    resize: str = "interpolate_pos_encoding"
    pixel_mask: bool = False
    min_text_len: int = 2

    def __call__(self, batch_size: int, *, text_len: int | None = None, image_size: int | None = None,
                 seed: int = 0) -> dict[str, Any]:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        data = _cached_dataset(self.spec, self.task)
        items = [data[(seed * 7919 + i) % len(data)] for i in range(batch_size)]
        batch = collate(items)
        batch.pop("labels")
        if text_len is not None:
            batch["input_ids"], batch["attention_mask"] = _fit_text(batch["input_ids"], batch["attention_mask"],
                                                                    self._check_len(text_len),
                                                                    WordTokenizer.sep_token_id)
        if image_size is not None and image_size != self.native_image:
            if not isinstance(image_size, int) or image_size < self.patch or image_size % self.patch:
                raise ConfigError(f"image_size must be a positive multiple of the patch size {self.patch}, "
                                  f"got {image_size!r}")
            batch["pixel_values"] = F.interpolate(batch["pixel_values"], size=(image_size, image_size),
                                                  mode="bilinear", align_corners=False)
            if self.resize == "interpolate_pos_encoding":
                batch["interpolate_pos_encoding"] = True
        if self.pixel_mask:
            side = batch["pixel_values"].shape[-1]
            batch["pixel_mask"] = torch.ones(batch_size, side, side, dtype=torch.long)
        return batch

    def _check_len(self, text_len: int) -> int:
        if not isinstance(text_len, int) or text_len < self.min_text_len:
            raise ConfigError(f"text_len must be an int >= {self.min_text_len}, got {text_len!r}")
        return text_len

    def hints(self, max_text_len: int) -> dict:
        masks = {"attention_mask": "text", **({"pixel_mask": "vision"} if self.pixel_mask else {})}
        return {"modalities": {"pixel_values": "vision", "input_ids": "text"}, "masks": masks,
                "special_tokens": {"vision": [0], "text": [0]},
                "image_size": {"native": self.native_image, "patch": self.patch, "variable": True, "via": self.resize},
                "text_len": {"default": None, "min": self.min_text_len, "max": max_text_len}}


def _fit_text(ids: torch.Tensor, mask: torch.Tensor, length: int, sep_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad with 0 or truncate ``[B, T]`` rows to `length`; a truncated row ends with ``[SEP]``."""
    if ids.shape[1] >= length:
        ids, mask = ids[:, :length].clone(), mask[:, :length].clone()
        cut = mask.sum(dim=1) == length  # rows whose [SEP] was cut off
        ids[cut, -1] = sep_id
        return ids, mask
    pad = length - ids.shape[1]
    return F.pad(ids, (0, pad)), F.pad(mask, (0, pad))


def bench_backbone(bench, *, split: str = "val", name: str | None = None) -> Backbone:
    """A `Backbone` of a trained `trimkit.bench.base.BenchModel` whose inputs come from `split`."""
    family = bench.config.family
    make_inputs = DataInputs(bench.data[split], bench.task, bench.config.patch, bench.config.image,
                             resize="native" if family == "vilt" else "interpolate_pos_encoding",
                             pixel_mask=family == "vilt")
    task = TaskAdapter("matching" if bench.task == "retrieval" else "classification", key="logits",
                       num_labels=bench.num_labels)
    hints = {"family": f"bench-{family}", "task_name": bench.task, "num_labels": bench.num_labels,
             "data": dict(bench.data), **make_inputs.hints(bench.config.max_text_len)}
    return Backbone(name=name or bench.name, model=bench.model.eval(), task=task, make_inputs=make_inputs,
                    hints=hints, source="factory")
