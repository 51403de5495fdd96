"""Factory references of the bench models: ``trimkit.bench:vilt_vqa`` (and the other names in
:data:`FACTORIES`) are model references (``--model trimkit.bench:vilt_vqa``); each trains the
default base model on first use and loads it from the cache afterwards."""

from __future__ import annotations

from typing import Any

from trimkit.backbones.base import Backbone
from trimkit.bench.backbone import bench_backbone
from trimkit.bench.base import train_base

__all__ = ["FACTORIES", "load_bench", "blip_vqa", "bridgetower_vqa", "vilt_vqa", "blip_truefalse",
           "bridgetower_truefalse", "vilt_truefalse"]


def load_bench(family: str, task: str, **kw: Any) -> Backbone:
    """The default bench model of `family` on `task` as a Backbone (trained on first use, then cached)."""
    bench = train_base(family, task, **kw)
    return bench_backbone(bench, name=f"trimkit.bench:{family}_{task}")


def blip_vqa() -> Backbone:
    return load_bench("blip", "vqa")


def bridgetower_vqa() -> Backbone:
    return load_bench("bridgetower", "vqa")


def vilt_vqa() -> Backbone:
    return load_bench("vilt", "vqa")


def blip_truefalse() -> Backbone:
    return load_bench("blip", "truefalse")


def bridgetower_truefalse() -> Backbone:
    return load_bench("bridgetower", "truefalse")


def vilt_truefalse() -> Backbone:
    return load_bench("vilt", "truefalse")


FACTORIES: dict[str, str] = {f"{fam}-{task}": f"trimkit.bench:{fam}_{task}"
                             for task in ("vqa", "truefalse") for fam in ("blip", "bridgetower", "vilt")}
