"""Bench models: small vision-language models trained from scratch on trimkit's synthetic tasks.

``train_base(family, task)`` trains (or loads from the cache) the full model the trimming
benchmark starts from; ``trimkit.bench:vilt_vqa`` and the other :data:`FACTORIES` are model
references for ``--model``. See ``trimkit/bench/README.md`` for the recipes and accuracies.
"""

from trimkit.bench.backbone import (FACTORIES, DataInputs, bench_backbone, blip_truefalse, blip_vqa,
                                    bridgetower_truefalse, bridgetower_vqa, load_bench, vilt_truefalse, vilt_vqa)
from trimkit.bench.base import BenchModel, TrainConfig, cache_root, default_recipe, evaluate, train_base
from trimkit.bench.models import FAMILIES, ModelConfig, build_model, model_config

__all__ = ["FAMILIES", "FACTORIES", "ModelConfig", "TrainConfig", "BenchModel", "DataInputs", "build_model",
           "model_config", "train_base", "evaluate", "default_recipe", "cache_root", "bench_backbone",
           "load_bench", "blip_vqa", "bridgetower_vqa", "vilt_vqa", "blip_truefalse", "bridgetower_truefalse",
           "vilt_truefalse"]
