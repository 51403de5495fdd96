"""Executed FLOPs, parameters, latency and memory of a model, per block and per input.

Counting happens at dispatch level (every aten op that actually runs, fused attention
kernels included), per input sample, 2 FLOPs per multiply-add; elementwise work is
reported under its own key. fvcore is available as a second counter. See
:mod:`trimkit.profile.formulas` for the op formulas and conventions.

Example::

    from trimkit.profile import profile_model, count_flops
    report = profile_model(model, inputs, blocks=blocks_from_map(model_map))
    count_flops(model, inputs).flops          # FLOPs per sample of one forward
    profile_generation(model, inputs, 16)     # decoders: prefill / decode FLOPs, KV cache, TTFT
"""
from trimkit.profile.api import compare, count_flops, flop_disagreement, placement_of, profile_model
from trimkit.profile.blocks import blocks_from_map, count_params
from trimkit.profile.counter import BlockCost, FlopReport
from trimkit.profile.generation import GenerationProfile, cache_bytes, compare_generation, profile_generation
from trimkit.profile.timing import compare_latency, measure_latency

__all__ = [
    "profile_model",
    "count_flops",
    "compare",
    "compare_latency",
    "measure_latency",
    "flop_disagreement",
    "placement_of",
    "blocks_from_map",
    "count_params",
    "profile_generation",
    "compare_generation",
    "GenerationProfile",
    "cache_bytes",
    "FlopReport",
    "BlockCost",
]
