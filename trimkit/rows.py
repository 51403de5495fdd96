"""Selecting batch rows of model inputs, packed image patches included.

Most inputs hold one row per sample along their first dimension. Packed vision inputs (HF's
``pixel_values`` with ``image_grid_thw``, as Qwen2-VL feeds them) stack every image's patch rows
in one tensor instead; the grid gives each image's ``t * h * w`` rows, one image per sample.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from trimkit.errors import ConfigError

__all__ = ["PACKED_INPUTS", "batch_size_of", "take_rows"]

# packed input -> the input holding its per-image patch grids
PACKED_INPUTS = {"pixel_values": "image_grid_thw", "pixel_values_videos": "video_grid_thw"}


def _values(inputs: Any) -> list[Any]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return list(inputs.values())
    return list(inputs)


def batch_size_of(inputs: Any) -> int:
    """The batch size: the image count of a packed input, else the first dimension of the first
    tensor with at least one dimension."""
    if isinstance(inputs, Mapping):
        for grid in PACKED_INPUTS.values():
            if isinstance(inputs.get(grid), torch.Tensor) and isinstance(inputs.get("input_ids"), torch.Tensor):
                return int(inputs["input_ids"].shape[0])
    for v in _values(inputs):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ConfigError("inputs hold no tensor with a batch dimension")


def _packed_rows(packed: torch.Tensor, grid: torch.Tensor, index: torch.Tensor, batch: int,
                 name: str) -> torch.Tensor:
    if grid.dim() != 2 or grid.shape[0] != batch:
        raise ConfigError(f"cannot split {name!r} into samples: {grid.shape[0]} images for {batch} rows "
                          "(one image per row is supported)")
    counts = grid.prod(-1).tolist()
    if sum(counts) != packed.shape[0]:
        raise ConfigError(f"{name!r} has {packed.shape[0]} patch rows, its grids say {sum(counts)}")
    chunks = torch.split(packed, counts)
    return torch.cat([chunks[int(i)] for i in index.tolist()])


def take_rows(inputs: Any, rows: Sequence[int] | torch.Tensor) -> Any:
    """Select batch rows (repeats allowed) from every batched tensor; the rest passes unchanged.

    Packed inputs (`PACKED_INPUTS`) keep the patch rows of the selected images.
    """
    batch = batch_size_of(inputs)
    index = torch.as_tensor(rows, dtype=torch.long)

    def pick(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            return v.index_select(0, index.to(v.device))
        return v

    if isinstance(inputs, torch.Tensor):
        return pick(inputs)
    if isinstance(inputs, Mapping):
        out = {}
        for k, v in inputs.items():
            grid = inputs.get(PACKED_INPUTS.get(k, ""))
            if isinstance(v, torch.Tensor) and isinstance(grid, torch.Tensor):
                out[k] = _packed_rows(v, grid, index, batch, k)
            else:
                out[k] = pick(v)
        return out
    picked = [pick(v) for v in inputs]
    return tuple(picked) if isinstance(inputs, tuple) else picked
