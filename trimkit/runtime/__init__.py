"""trimkit.runtime: applying token and head decisions inside a located model.

A pass says WHAT to keep through a *decider* (:mod:`.deciders`); the runtimes know HOW: token
removal, skip mode, padding and key masks, packed FFNs (:class:`TokenRuntime`), head slicing
(:class:`HeadRuntime`), image-token trimming inside a decoder VLM's language model with its KV cache
(:class:`DecoderRuntime`). :mod:`.probe` holds the apply-time checks the token passes share,
:mod:`.control` the switches over every runtime of a model, :mod:`.state` what trimkit stores on it.
"""
from trimkit.runtime import state
from trimkit.runtime.control import (register_runtime, runtimes, set_tau, set_threshold, train_logits, trim_stats,
                                     trimming_off, unregister_runtime)
from trimkit.runtime.deciders import (HeadDecider, HeadDecision, ScoreDecider, SiteStep, TokenDecider, TokenDecision,
                                      TokenStep, relaxed_decision, threshold_keep)
from trimkit.runtime.decoder import DecoderRuntime, cache_length, decoder_mask
from trimkit.runtime.headcheck import check_sites
from trimkit.runtime.heads import HeadRuntime, relaxed_heads
from trimkit.runtime.probe import (REMOVE, SKIP, WHOLE, candidate_streams, capture_padded, per_token_streams,
                                   probe_removal, probe_stream, probe_streams, side_by_side, split_row, stream_report,
                                   task_logits, with_padding)
from trimkit.runtime.sites import LAYOUT_NAMES, SitePlan, plan_site
from trimkit.runtime.slicing import keep_rows
from trimkit.runtime.streams import StreamState
from trimkit.runtime.tokens import TokenRuntime

__all__ = [
    # switches
    "trimming_off", "set_threshold", "set_tau", "train_logits", "trim_stats", "runtimes", "register_runtime",
    "unregister_runtime", "state",
    # deciders
    "TokenDecider", "TokenStep", "TokenDecision", "ScoreDecider", "threshold_keep", "relaxed_decision",
    "HeadDecider", "SiteStep", "HeadDecision", "keep_rows", "relaxed_heads",
    # runtimes
    "TokenRuntime", "StreamState", "DecoderRuntime", "cache_length", "decoder_mask", "HeadRuntime", "SitePlan", "plan_site", "check_sites", "LAYOUT_NAMES",
    # apply-time work
    "capture_padded", "task_logits", "per_token_streams", "candidate_streams", "with_padding", "split_row",
    "probe_removal", "probe_stream", "probe_streams", "stream_report", "side_by_side", "WHOLE", "REMOVE", "SKIP",
]
