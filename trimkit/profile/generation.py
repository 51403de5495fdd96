"""Greedy generation profile of a decoder: prefill vs decode FLOPs, KV-cache bytes, TTFT, per-token latency.

The model's own ``generate`` runs (Hugging Face's ``GenerationMixin.generate`` or any method of that
name taking ``max_new_tokens``); a forward hook on the model counts its top-level calls: the first
is the prefill, every later one a decode step. FLOPs are the dispatch-level counter's, attention
included, per sample. The KV cache is read from each call's output (``cache`` / ``past_key_values``)
and measured as the bytes of the tensor storage it holds, whatever holds them (HF ``Cache`` classes,
tuples, lists, dicts, plain objects).

The prefill is everything from ``generate``'s start to the end of the first call (HF models may
encode the images before that call), a decode step everything after the previous call up to the
end of its own. Times come from separate, uncounted runs (median over repeats): time to first token
is from ``generate``'s start to the second call's start (input preparation, the prefill forward and
picking the token), a decode step from one call's start to the next (the last one to ``generate``'s
return).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import statistics
import time
from typing import Any, Callable, Iterator, Mapping

import torch

from trimkit.errors import ConfigError, TrimkitError
from trimkit.profile.counter import FlopRecorder
from trimkit.profile.inputs import Inputs, batch_size_of
from trimkit.profile.running import capture_error, eval_mode, fixed_threads, model_name
from trimkit.profile.timing import cuda_devices, synchronize

__all__ = ["GenerationProfile", "cache_bytes", "profile_generation", "compare_generation"]

CACHE_KEYS = ("cache", "past_key_values", "cache_params")
_GREEDY = {"do_sample": False, "num_beams": 1, "use_cache": True}


@dataclasses.dataclass(frozen=True)
class GenerationProfile:
    """One greedy generation of `new_tokens` tokens; FLOPs per sample, cache bytes of the whole batch."""

    new_tokens: int
    batch_size: int
    prompt_tokens: int
    prefill_flops: float
    decode_flops_per_token: float | None
    kv_cache_bytes: dict[str, int | None]
    ttft_ms: float
    per_token_ms: float | None
    forward_calls: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- cache bytes


def _tensors(obj: Any, seen: set[int], depth: int) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth <= 0 or id(obj) in seen or isinstance(obj, (torch.nn.Module, str, bytes, int, float, bool, type)):
        return
    seen.add(id(obj))
    if isinstance(obj, Mapping):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    else:
        items = list(getattr(obj, "__dict__", {}).values())
    for item in items:
        yield from _tensors(item, seen, depth - 1)


def cache_bytes(cache: Any) -> int:
    """Bytes of the tensor storage a cache object holds (each storage once; HF ``Cache`` classes,
    tuples / lists / dicts of tensors and plain objects holding them; modules are not entered)."""
    storages: dict[tuple[str, int], int] = {}
    for t in _tensors(cache, set(), depth=8):
        storage = t.untyped_storage()
        storages[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _cache_of(output: Any) -> Any:
    for key in CACHE_KEYS:
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if value is not None:
            return value
    return None


# --------------------------------------------------------------------------- calling generate


def _generate_fn(model: torch.nn.Module, new_tokens: int) -> Callable[[Inputs], Any]:
    generate = getattr(model, "generate", None)
    if not callable(generate):
        raise ConfigError(f"{model_name(model)} has no generate method: --generate needs a decoder "
                          "(a Hugging Face generation model or a model with generate(..., max_new_tokens=N))")
    params = inspect.signature(generate).parameters
    open_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    if "max_new_tokens" not in params and not open_kwargs:
        raise ConfigError(f"{model_name(model)}.generate takes no max_new_tokens argument")
    extra = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, **_GREEDY}
    extra = {k: v for k, v in extra.items() if k in params or open_kwargs}

    def run(inputs: Inputs) -> Any:
        if not isinstance(inputs, Mapping):
            raise ConfigError("--generate needs keyword inputs (a dict such as input_ids, pixel_values)")
        return generate(**inputs, **extra)
    return run


class _CallLog:
    """Per top-level forward call: its start time, FLOPs counted since the previous call ended (the
    first call: since ``generate`` began, so work ``generate`` does before it, such as encoding the
    images ahead of the first forward, is prefill), and the cache bytes after it."""

    def __init__(self, recorder: FlopRecorder | None = None):
        self.recorder = recorder
        self.starts: list[float] = []
        self.flops: list[float] = []
        self.cache: list[int | None] = []
        self._depth = 0
        self._counted = 0.0
        self.devices: list[torch.device] = []

    def _total(self) -> float:
        return float(sum(self.recorder.flops.values())) if self.recorder is not None else 0.0

    def pre(self, module, args, kwargs) -> None:
        self._depth += 1
        if self._depth == 1:
            synchronize(self.devices)
            self.starts.append(time.perf_counter())

    def post(self, module, args, kwargs, output) -> None:
        self._depth -= 1
        if self._depth == 0:
            total = self._total()
            self.flops.append(total - self._counted)
            self._counted = total
            if self.recorder is not None:
                cache = _cache_of(output)
                self.cache.append(None if cache is None else cache_bytes(cache))

    @contextlib.contextmanager
    def attached(self, model: torch.nn.Module) -> Iterator["_CallLog"]:
        self.devices = cuda_devices(model)
        handles = [model.register_forward_pre_hook(self.pre, with_kwargs=True),
                   model.register_forward_hook(self.post, with_kwargs=True)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _run(model, run, inputs, name, recorder=None) -> tuple[_CallLog, float, float]:
    """Run generate once: its call log, start and end times."""
    log = _CallLog(recorder)
    try:
        with log.attached(model), (recorder if recorder is not None else contextlib.nullcontext()):
            synchronize(log.devices)
            begin = time.perf_counter()
            run(inputs)
            synchronize(log.devices)
            end = time.perf_counter()
    except TrimkitError:
        raise
    except Exception as exc:
        path, op = recorder.failure if recorder is not None and recorder.failure else ("generate", None)
        raise capture_error(name, path, op, exc) from exc
    return log, begin, end


def _steps_ms(log: _CallLog, begin: float, end: float) -> list[float]:
    """Milliseconds to the first token (generate's start to the second call), then of each later step."""
    marks = [begin] + log.starts[1:] + [end]
    return [(b - a) * 1000.0 for a, b in zip(marks, marks[1:])]


def _prompt_tokens(inputs: Inputs) -> int:
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    return int(ids.shape[-1]) if isinstance(ids, torch.Tensor) else 0


def _check(new_tokens: int, warmup: int, repeats: int) -> None:
    if new_tokens < 1:
        raise ConfigError(f"new tokens must be at least 1, got {new_tokens}")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")


def _counted(model, run, inputs, name) -> _CallLog:
    with eval_mode(model), torch.inference_mode():
        log, _, _ = _run(model, run, inputs, name, FlopRecorder(model, {}))
    if not log.flops:
        raise ConfigError(f"{name}.generate never called the model's forward: nothing to profile")
    return log


def _timed(models: list, inputs: Inputs, threads: int, warmup: int, repeats: int) -> list[list[list[float]]]:
    """Per model, per repeat, the milliseconds of each forward call's step; the models interleaved."""
    steps: list[list[list[float]]] = [[] for _ in models]
    with contextlib.ExitStack() as stack:
        for model, _, _ in models:
            stack.enter_context(eval_mode(model))
        stack.enter_context(torch.inference_mode())
        stack.enter_context(fixed_threads(threads))
        for i in range(warmup + repeats):
            for j, (model, run, name) in enumerate(models):
                log, begin, end = _run(model, run, inputs, name)
                if i >= warmup:
                    steps[j].append(_steps_ms(log, begin, end))
    return steps


def _profile(log: _CallLog, steps: list[list[float]], inputs: Inputs, new_tokens: int) -> GenerationProfile:
    batch = batch_size_of(inputs)
    decode = log.flops[1:]
    per_token = [ms for s in steps for ms in s[1:]]
    return GenerationProfile(
        new_tokens=new_tokens, batch_size=batch, prompt_tokens=_prompt_tokens(inputs),
        prefill_flops=log.flops[0] / batch,
        decode_flops_per_token=statistics.mean(decode) / batch if decode else None,
        kv_cache_bytes={"prefill": log.cache[0], "final": log.cache[-1]},
        ttft_ms=statistics.median(s[0] for s in steps),
        per_token_ms=statistics.median(per_token) if per_token else None,
        forward_calls=len(log.flops))


def profile_generation(model: torch.nn.Module, inputs: Inputs, new_tokens: int, *, threads: int = 1,
                       warmup: int = 1, repeats: int = 3, name: str | None = None) -> GenerationProfile:
    """Greedy generation of `new_tokens` tokens on `inputs` (see the module docstring).

    ``kv_cache_bytes``: ``prefill`` after the first call, ``final`` after the last one (the prompt
    and ``new_tokens - 1`` generated tokens: the last token is never fed back).
    """
    _check(new_tokens, warmup, repeats)
    name = name or model_name(model)
    run = _generate_fn(model, new_tokens)
    log = _counted(model, run, inputs, name)
    (steps,) = _timed([(model, run, name)], inputs, threads, warmup, repeats)
    return _profile(log, steps, inputs, new_tokens)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare_generation(before: torch.nn.Module, after: torch.nn.Module, inputs: Inputs, new_tokens: int, *,
                       threads: int = 1, warmup: int = 1, repeats: int = 3) -> dict:
    """``{"before", "after", "speedup"}`` of two models' generation profiles, timed interleaved
    (speedup = before / after, > 1 is faster or smaller)."""
    _check(new_tokens, warmup, repeats)
    models = [(m, _generate_fn(m, new_tokens), f"{model_name(m)} ({side})")
              for m, side in ((before, "before"), (after, "after"))]
    logs = [_counted(m, run, inputs, name) for m, run, name in models]
    steps = _timed(models, inputs, threads, warmup, repeats)
    a, b = (_profile(log, s, inputs, new_tokens) for log, s in zip(logs, steps))
    speedup = {"prefill_flops": _ratio(a.prefill_flops, b.prefill_flops),
               "decode_flops_per_token": _ratio(a.decode_flops_per_token, b.decode_flops_per_token),
               "kv_cache_bytes": _ratio(a.kv_cache_bytes["final"], b.kv_cache_bytes["final"]),
               "ttft": _ratio(a.ttft_ms, b.ttft_ms), "per_token": _ratio(a.per_token_ms, b.per_token_ms)}
    return {"before": a.to_dict(), "after": b.to_dict(), "speedup": speedup}
