"""Bench models: small vision-language models trained from scratch on trimkit's synthetic tasks.

``train_base(family, task)`` trains (or loads from the cache) the full model the trimming
benchmark starts from; ``trimkit.bench:vilt_vqa`` and the other :data:`FACTORIES` are model
references for ``--model``. See ``trimkit/bench/README.md`` for the recipes and accuracies.
"""

from trimkit.bench.backbone import DataInputs, bench_backbone
from trimkit.bench.factories import (FACTORIES, blip_truefalse, blip_vqa, bridgetower_truefalse, bridgetower_vqa,
                                     load_bench, vilt_truefalse, vilt_vqa)
from trimkit.bench.base import BaseTrainConfig, BenchModel, base_metrics, cache_root, default_recipe, train_base
from trimkit.bench.models import FAMILIES, ModelConfig, build_model, model_config

__all__ = ["FAMILIES", "FACTORIES", "ModelConfig", "BaseTrainConfig", "BenchModel", "DataInputs", "build_model",
           "model_config", "train_base", "base_metrics", "default_recipe", "cache_root", "bench_backbone",
           "load_bench", "blip_vqa", "bridgetower_vqa", "vilt_vqa", "blip_truefalse", "bridgetower_truefalse",
           "vilt_truefalse"]
