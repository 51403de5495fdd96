"""Where a decoder VLM writes vision features into its language model's sequence, found from dataflow.

Decoder VLMs (LLaVA, Qwen2-VL, ...) run a vision tower, project its features and *splice* them into
the input embeddings of a language model: a masked scatter at placeholder tokens, an index
assignment, a concatenation. Which positions of the language model's sequence hold image features
is a property of each input (any number of images, anywhere in the prompt), so it is traced in
every forward rather than written per model:

* the output of every layer of a vision stream is *tainted* (a boolean shadow of its shape, all
  True);
* between those layers and the language model's first layer a ``TorchFunctionMode`` propagates
  shadows through every operation: structural operations (scatter, index assignment, cat, views,
  indexing, ``where``) are replayed on the shadows, so a masked scatter of tainted features into
  clean embeddings gives exactly the spliced positions; any other operation with a tainted input
  taints its output elementwise where shapes broadcast, token-wise where only the last dim differs
  (linear layers), and wholly otherwise;
* the language model's first layer reads the shadow of its hidden states: ``[B, L]`` True at image
  positions.

The mode is paused inside the vision layers (their outputs are tainted wholly anyway), so it sees
only the few operations of the projector and the splice.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["ShadowMode", "SpliceTracker", "image_positions", "trace_splice", "find_image_span"]

# operations replayed on the shadows: name -> positions of their data arguments (the others, such
# as masks and indices, are passed unchanged); "all" = every tensor of the first (list) argument
_REPLAY: dict[str, tuple | str] = {
    "masked_scatter": (0, 2), "masked_scatter_": (0, 2), "__setitem__": (0, 2), "index_put": (0, 2),
    "index_put_": (0, 2), "scatter": (0, 3), "scatter_": (0, 3), "index_copy": (0, 3), "index_copy_": (0, 3),
    "where": (1, 2), "cat": "all", "concat": "all", "concatenate": "all", "stack": "all",
}
_VIEWS = frozenset({
    "__getitem__", "view", "reshape", "permute", "transpose", "flatten", "unflatten", "squeeze", "unsqueeze",
    "expand", "expand_as", "contiguous", "clone", "narrow", "select", "split", "chunk", "unbind", "index_select",
    "gather", "repeat", "roll", "flip", "t", "movedim", "swapaxes", "view_as", "reshape_as", "tensor_split",
    "repeat_interleave",
})
_SAME = frozenset({"to", "type", "float", "half", "bfloat16", "double", "detach", "requires_grad_", "cpu",
                   "cuda", "type_as"})


class ShadowMode(TorchFunctionMode):
    """Propagates boolean shadows (True: derived from a tainted tensor) through torch functions.

    Results are never changed: the function runs as called, and the shadows are computed beside it.
    """

    def __init__(self):
        super().__init__()
        # id -> (weak reference to the tensor, its shadow): a tensor's shadow lives as long as the tensor,
        # so features computed once and spliced in several forwards (uncached generation) stay known
        self._shadow: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        self.splices: list[str] = []  # functions that wrote tainted values into a clean tensor
        self.active = False
        self.budget = 100_000  # operations observed before giving up (vision features never spliced)
        self._seen = 0

    # -- shadows ----------------------------------------------------------------------------------
    def taint(self, t: torch.Tensor, shadow: torch.Tensor | None = None) -> None:
        if shadow is None:
            shadow = torch.ones(t.shape, dtype=torch.bool, device=t.device)
        if len(self._shadow) > 4096:
            self._shadow = {k: v for k, v in self._shadow.items() if v[0]() is not None}
        self._shadow[id(t)] = (weakref.ref(t), shadow)

    def shadow(self, t: Any) -> torch.Tensor | None:
        entry = self._shadow.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0]() is t else None

    def clear(self) -> None:
        self._shadow.clear()
        self.splices.clear()
        self._seen = 0

    def new_forward(self) -> None:
        self.splices.clear()
        self._seen = 0

    @property
    def pending(self) -> bool:
        """Tainted tensors are alive: vision features computed before a forward may be spliced in it."""
        return any(ref() is not None for ref, _ in self._shadow.values())

    # -- the mode ---------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.active:
            self.__enter__()
            self.active = True

    def pause(self) -> None:
        if self.active:
            self.__exit__(None, None, None)
            self.active = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._seen += 1
        if self._seen > self.budget:  # the features went elsewhere: stop observing
            self.clear()
            self.__exit__(None, None, None)
            self.active = False
            return out
        flat_in = tree_flatten((args, kwargs))[0]
        if not any(self.shadow(v) is not None for v in flat_in):
            return out
        name = getattr(func, "__name__", "")
        try:
            self._propagate(name, args, kwargs, out)
        except Exception:  # a shadow that cannot be replayed: taint the outputs wholly
            for t in _tensors(out if out is not None else args[0]):
                self.taint(t)
        return out

    def _propagate(self, name: str, args, kwargs, out) -> None:
        if name in _REPLAY:
            replayed = self._replay(name, args, kwargs)
            target = args[0] if out is None or name.endswith("_") or name == "__setitem__" else out
            if isinstance(target, torch.Tensor) and isinstance(replayed, torch.Tensor):
                if self.shadow(target) is None or not bool(replayed.all()):
                    if not bool(replayed.all()) and bool(replayed.any()):
                        self.splices.append(name)
                self.taint(target, replayed)
            return
        if name in _VIEWS:
            first = self.shadow(args[0]) if args else None
            if first is not None:
                shadow = getattr(torch.Tensor, name)(first, *args[1:], **kwargs)
                self._assign(out, shadow)
                return
        if name in _SAME and args and self.shadow(args[0]) is not None:
            for t in _tensors(out):
                if t.shape == args[0].shape:
                    self.taint(t, self.shadow(args[0]))
            return
        self._generic(args, kwargs, out)

    def _replay(self, name: str, args, kwargs):
        data = _REPLAY[name]

        def as_shadow(v):
            s = self.shadow(v)
            if s is not None:
                return s
            return torch.zeros(v.shape, dtype=torch.bool, device=v.device) if isinstance(v, torch.Tensor) else v

        if data == "all":
            tensors = [as_shadow(v) for v in args[0]]
            return getattr(torch, name)(tensors, *args[1:], **kwargs)
        new = list(args)
        for i in data:
            if i < len(new):
                new[i] = as_shadow(new[i])
        if name == "__setitem__":
            base = new[0].clone()
            base[new[1]] = new[2]
            return base
        if name == "where":
            return torch.where(new[0], *new[1:], **kwargs)
        method = name.rstrip("_")
        return getattr(torch.Tensor, method)(*new, **kwargs)

    def _assign(self, out, shadow) -> None:
        outs, sh = _tensors(out), _tensors(shadow)
        for t, s in zip(outs, sh):
            if t.shape == s.shape:
                self.taint(t, s)
            else:
                self.taint(t)

    def _generic(self, args, kwargs, out) -> None:
        tainted = [(v, self.shadow(v)) for v in tree_flatten((args, kwargs))[0] if self.shadow(v) is not None]
        for t in _tensors(out):
            acc = None
            for _, s in tainted:
                part = _fit(s, t.shape)
                acc = part if acc is None else acc | part
            self.taint(t, acc)


def _tensors(x) -> list[torch.Tensor]:
    return [v for v in tree_flatten(x)[0] if isinstance(v, torch.Tensor)]


def _fit(shadow: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A tainted input's shadow carried to an output of ``shape``: broadcast, token-wise, or whole."""
    try:
        return shadow.expand(shape).clone() if shadow.shape != shape else shadow
    except RuntimeError:
        pass
    if shadow.dim() == len(shape) and shadow.dim() >= 1 and shadow.shape[:-1] == shape[:-1]:
        return shadow.any(-1, keepdim=True).expand(shape).clone()
    return torch.ones(shape, dtype=torch.bool, device=shadow.device)


def image_positions(shadow: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
    """``[B, L]`` bool image positions from the shadow of batch-first hidden states ``[B, L, D]``
    (None: nothing spliced, or everything tainted: no text left to tell apart)."""
    if shadow is None or shadow.shape != hidden.shape or hidden.dim() != 3:
        return None
    pos = shadow.any(-1)
    if bool(pos.all()) or not bool(pos.any()):
        return None
    return pos


class SpliceTracker:
    """Hooks that trace, in every forward, which positions of ``lm_first`` layer's input are image features.

    ``vision_layers``: the layers of the vision streams (their outputs are tainted); ``lm_first``: the
    first layer of the language model. After a forward with images, ``positions`` is ``[B, L]`` bool;
    it is None for forwards without images (decoding steps, text-only prompts).

    The vision features may be computed inside the model's forward or before it (``generate``
    encodes images first and hands the features to the forward): the shadows then stay pending
    until the next forward splices them.
    """

    def __init__(self, model: nn.Module, vision_layers: list[str], lm_first: str, main_arg=None):
        self.model, self.vision_layers, self.lm_first = model, list(vision_layers), lm_first
        self.mode = ShadowMode()
        self.positions: torch.Tensor | None = None
        self.splices: list[str] = []
        self.enabled = True
        self.handles: list = []
        self._main_arg = main_arg or (lambda args, kwargs: args[0] if args else kwargs.get("hidden_states"))
        self._install()

    def _install(self) -> None:
        m = self.model
        self.handles.append(m.register_forward_pre_hook(self._reset))
        self.handles.append(m.register_forward_hook(self._finish, always_call=True))
        for path in self.vision_layers:
            mod = m.get_submodule(path)
            self.handles.append(mod.register_forward_pre_hook(self._pause))
            self.handles.append(mod.register_forward_hook(self._taint, always_call=True))
        self.handles.append(m.get_submodule(self.lm_first).register_forward_pre_hook(self._read, with_kwargs=True))

    def remove(self) -> None:
        self.mode.pause()
        self.mode.clear()
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _reset(self, module, args) -> None:
        self.positions = None
        self.mode.new_forward()
        if self.mode.pending and self.enabled:
            self.mode.start()  # the vision features were computed before this call (generate does so)
        else:
            self.mode.pause()
            self.mode.clear()

    def _pause(self, module, args) -> None:
        self.mode.pause()

    def _taint(self, module, args, output) -> None:
        if not self.enabled:
            return
        for t in _tensors(output):
            if t.is_floating_point():
                self.mode.taint(t)
        self.mode.start()

    def _read(self, module, args, kwargs) -> None:
        was_active = self.mode.active
        self.mode.pause()
        if not was_active:
            self.positions = None
            return
        hidden = self._main_arg(args, kwargs)
        self.positions = image_positions(self.mode.shadow(hidden), hidden) if isinstance(hidden, torch.Tensor) else None
        self.splices = list(dict.fromkeys(self.mode.splices))

    def _finish(self, module, args, output) -> None:
        self.mode.pause()



def trace_splice(model: nn.Module, inputs: dict, vision_layers: list[str], lm_first: str) -> SpliceTracker:
    """One forward of ``inputs`` (no gradient) under a :class:`SpliceTracker`, removed afterwards: its
    ``positions`` and ``splices`` tell what that forward spliced."""
    tracker = SpliceTracker(model, vision_layers, lm_first)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        tracker.remove()
    return tracker


def find_image_span(model: nn.Module, inputs: dict, vision_layers: list[str],
                    candidates: list[tuple[str, str]]) -> dict | None:
    """Which stream receives spliced vision features, and where, on one forward of ``inputs``.

    ``candidates``: (stream name, path of its first layer) of the streams that may be a language
    model. Returns ``{"stream", "ops", "positions"}`` (positions: per row, the image positions of
    the example) for the first candidate whose input holds image features among other tokens.
    """
    if not vision_layers:
        return None
    was = model.training
    model.eval()
    try:
        for name, first in candidates:
            tracker = trace_splice(model, inputs, vision_layers, first)
            if tracker.positions is not None:
                rows = [row.nonzero().view(-1).tolist() for row in tracker.positions]
                return {"stream": name, "ops": tracker.splices, "positions": rows}
    finally:
        model.train(was)
    return None
