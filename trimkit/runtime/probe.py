"""Apply-time work shared by the token passes: capture with a padded row, the task logits, the
streams whose tokens are outputs, and probing how each stream can lose tokens (removal, skip mode,
or not at all) with random decisions."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from trimkit.graph import Capture, capture
from trimkit.locate import ModelMap
from trimkit.runtime.deciders import ScoreDecider, TokenStep
from trimkit.runtime.tokens import TokenRuntime
from trimkit.rows import batch_size_of, take_rows

__all__ = ["capture_padded", "task_logits", "per_token_streams", "candidate_streams", "with_padding", "split_row",
           "rows_disagree", "ProbeDecider", "probe_removal", "probe_stream", "probe_streams", "stream_report", "REMOVE",
           "SKIP", "WHOLE", "side_by_side"]

WHOLE, REMOVE, SKIP = 0, 1, 2


def capture_padded(model: nn.Module, inputs: dict) -> Capture:
    """The recorded forward on ``inputs`` with one padded row: models that skip their attention mask
    on unpadded batches show it."""
    return capture(model, with_padding(inputs))


def task_logits(hints: dict | None, output) -> torch.Tensor | None:
    """The task logits of a model output: from the backbone's task adapter, else ``output.logits``."""
    task = hints.get("task") if hints else None
    try:
        logits = task.logits(output) if task is not None else None
    except Exception:  # an adapter that cannot read this output: fall back to .logits
        logits = None
    if logits is None:
        first = getattr(output, "logits", None)
        logits = first if isinstance(first, torch.Tensor) else None
    return logits


def stream_report(trimmed: list[str], skip: list[str], skipped: list[str], per_token: set[str]) -> dict:
    """The stream facts every token pass reports: trimmed, in skip mode, left whole, per-token outputs."""
    return {"trimmed_streams": list(trimmed), "skip_mode_streams": list(skip), "skipped_streams": list(skipped),
            "per_token_streams": sorted(per_token)}


def side_by_side(model_map: ModelMap) -> dict[str, str]:
    """Streams whose layers are the modules of an earlier stream (one call runs both side by side) ->
    that stream. The token runtime follows one stream per module call: the earlier one."""
    owner: dict[str, str] = {}
    out: dict[str, str] = {}
    for s in model_map.streams:
        for layer in s.layers:
            first = owner.setdefault(layer.path, s.name)
            if first != s.name:
                out.setdefault(s.name, first)
    return out


def candidate_streams(model_map: ModelMap, pattern, per_token: set[str], start_layer: int) -> list[str]:
    """Streams matching ``pattern`` (a compiled regex) that are not per-token outputs, have a layer at
    ``start_layer`` and do not run inside another stream's layers (:func:`side_by_side`)."""
    shared = side_by_side(model_map)
    return [s.name for s in model_map.streams if pattern.search(s.name) and s.name not in per_token
            and len(s.layers) > start_layer and s.name not in shared]


def per_token_streams(model_map: ModelMap, cap, logits: torch.Tensor | None) -> set[str]:
    """Streams whose length shows up in the task logits (their tokens are outputs: never trimmed)."""
    out = set()
    if logits is None or logits.dim() < 3:
        return out
    for s in model_map.streams:
        call = next((c for c in cap.calls if c.path == s.layers[-1].path), None)
        if call is None or not call.outputs:
            continue
        shape = call.outputs[0].meta["trimkit.shape"]
        if shape and len(shape) == 3 and logits.shape[1] == shape[1]:
            out.add(s.name)
    return out


def with_padding(inputs: dict) -> dict:
    """``inputs`` with the last position of row 0 padded in every all-ones 2-D ``*mask*`` input."""
    out = dict(inputs)
    for name, v in inputs.items():
        if ("mask" in name and isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] > 2
                and not v.is_floating_point() and bool((v == 1).all())):
            v = v.clone()
            v[0, -1] = 0
            out[name] = v
    return out


def split_row(inputs: dict, i: int) -> dict:
    return take_rows(inputs, [i])


def rows_disagree(model: nn.Module, inputs: dict, batched, tol: float = 1e-4) -> str:
    """Name of the first output that differs between the batch and its rows run one by one ('' if none)."""
    flat_b = [t for t in tree_flatten(batched)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    n = batch_size_of(inputs) if any(isinstance(v, torch.Tensor) and v.dim() for v in inputs.values()) else 1
    if n < 2:
        return ""
    rows = [[t for t in tree_flatten(model(**split_row(inputs, i)))[0]
             if isinstance(t, torch.Tensor) and t.is_floating_point()] for i in range(n)]
    for j, tb in enumerate(flat_b):
        parts = [r[j] for r in rows if j < len(r)]
        if len(parts) != n or tb.dim() == 0 or tb.shape[0] != n or any(p.shape[1:] != tb.shape[1:] for p in parts):
            continue
        err = (torch.cat(parts) - tb).abs().max().item()
        if err > tol * max(1.0, tb.abs().max().item()):
            return f"output {j}: max difference {err:.3g}"
    return ""


class ProbeDecider(ScoreDecider):
    """Random-looking decisions that depend on the tokens only (so a row decides the same alone
    and in a batch), with a keep rate that differs by row, so a padded batch mixes lengths.
    ``seeds``: layer path -> seed."""

    def __init__(self, seeds: dict[str, int]):
        self.seeds = seeds

    def logits(self, step: TokenStep, g_self: torch.Tensor, g_other, fast: bool) -> torch.Tensor:
        x = step.hidden
        gen = torch.Generator().manual_seed(self.seeds[step.layer])
        w = torch.randn(x.shape[-1], 2, generator=gen).to(x.dtype)
        scale = x.shape[-1] ** 0.5
        token = torch.nn.functional.cosine_similarity(x, w[:, 0].expand_as(x), dim=-1) * scale
        offset = torch.nn.functional.cosine_similarity(g_self, w[:, 1].expand_as(g_self), dim=-1) * scale
        return 3 * token + 2 * torch.tanh(offset).unsqueeze(1)


def probe_removal(model: nn.Module, model_map: ModelMap, cap, layers, other: dict, special: dict, text_embed,
                  inputs: dict, skip: list[str]) -> str:
    """Why removing tokens with random decisions at ``layers`` (paths) breaks the model ('' when it does not).
    The probe leaves the global random state as it found it (some models draw in their forward)."""
    with torch.random.fork_rng(devices=[]):
        return _probe_forward(model, model_map, cap, layers, other, special, text_embed, inputs, skip)


def _probe_forward(model: nn.Module, model_map: ModelMap, cap, layers, other: dict, special: dict, text_embed,
                   inputs: dict, skip: list[str]) -> str:
    seeds = {p: i for i, p in enumerate(layers)}
    probe = TokenRuntime(model, model_map, cap, ProbeDecider(seeds), seeds, other, threshold=0.5, special=special,
                         text_embed=text_embed, skip=skip)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            batched = model(**inputs)
            mismatch = rows_disagree(model, inputs, batched)
            probe.threshold = 1.0
            model(**inputs)
            padded = with_padding(inputs)  # a padded text row takes other paths in some models
            if padded is not inputs and any(padded[k] is not inputs[k] for k in inputs):
                for threshold in (0.5, 1.0):
                    probe.threshold = threshold
                    model(**padded)
        if mismatch:
            return (f"with tokens removed, a padded batch and row-by-row runs disagree ({mismatch}); "
                    "something reads its tokens by position")
        return ""
    except Exception as exc:  # the probe decides; any failure means "not trimmable this way"
        return f"removing its tokens breaks the forward ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    finally:
        probe.remove()
        model.train(was_training)


def probe_stream(model: nn.Module, model_map: ModelMap, cap, layers: list[str], other: dict, special: dict,
                 text_embed, inputs: dict, name: str) -> tuple[int, str]:
    """``(mode, why)``: REMOVE when removing tokens at ``layers`` works, else SKIP when skip mode for
    stream ``name`` does, else WHOLE with the reason."""
    verdict = ""
    for mode in (REMOVE, SKIP):
        verdict = probe_removal(model, model_map, cap, layers, other, special, text_embed, inputs,
                                skip=[name] if mode == SKIP else [])
        if not verdict:
            return mode, ""
    return WHOLE, verdict


SKIP_NOTE = ("every layer's output is read at full length, so pruned tokens skip the layers and are carried "
             "through (skip mode)")


def probe_streams(model: nn.Module, model_map: ModelMap, cap, layers: dict[str, list[str]], other: dict,
                  special: dict, text_embed, inputs: dict, joint: bool = True,
                  skip_note: str = SKIP_NOTE) -> tuple[dict[str, int], list[str]]:
    """Probe each stream of ``layers`` ({stream: trimmed layer paths}) alone, then (``joint``) the
    working ones together, leaving out, last first, the streams the joint run needs whole.
    Returns ({stream: WHOLE | REMOVE | SKIP}, notes)."""
    modes, notes = {}, []
    for name, paths in layers.items():
        modes[name], why = probe_stream(model, model_map, cap, paths, other, special, text_embed, inputs, name)
        if modes[name] == SKIP:
            notes.append(f"stream '{name}': {skip_note}")
        elif why:
            notes.append(f"stream '{name}' left whole: {why}")
    if not joint:
        return modes, notes
    kept = [n for n in layers if modes[n] != WHOLE]

    def together(names: list[str]) -> str:
        paths = [p for n in names for p in layers[n]]
        return probe_removal(model, model_map, cap, paths, other, special, text_embed, inputs,
                             skip=[n for n in names if modes[n] == SKIP]) if names else ""

    verdict = together(kept)
    while verdict:
        for name in reversed(kept):
            if not together([n for n in kept if n != name]):
                break
        else:
            name = kept[-1]
        notes.append(f"stream '{name}' left whole: trimmed together with the others, {verdict}")
        kept.remove(name)
        modes[name] = WHOLE
        verdict = together(kept)
    return modes, notes
