"""The one ``TorchFunctionMode`` for attention."""
from __future__ import annotations

from torch.overrides import TorchFunctionMode

from trimkit.attention.actions import Action
from trimkit.attention.registry import kind_of_function

__all__ = ["AttentionMode", "ModeStack"]


class AttentionMode(TorchFunctionMode):
    """Applies ``actions`` to the attention calls made while it is active (``with AttentionMode(a, b):``
    or ``__enter__`` / ``__exit__`` from module hooks).

    A call is an attention call when its function belongs to a registered kind
    (:func:`~trimkit.attention.kind_of_function`); every action sees those, and the calls of the
    functions in its own ``functions`` (see :class:`~trimkit.attention.Action`). The actions that see a
    call are chained in the order given: the first one sees the call first and the result last. Torch
    functions an action calls itself are not seen by the other actions of the same mode; a mode entered
    later (inside this one) sees them.
    """

    def __init__(self, *actions: Action):
        super().__init__()
        if not actions:
            raise ValueError("AttentionMode needs at least one action")
        self.actions = actions
        self._extra = frozenset().union(*(a.functions for a in actions))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = kind_of_function(func)
        if kind is None:
            if not self._wanted(func):
                return func(*args, **kwargs)
            chain = [a for a in self.actions if func in a.functions]
        else:
            chain = self.actions

        return self._chain(chain, kind, func)(args, kwargs)

    def _wanted(self, func) -> bool:
        try:
            return func in self._extra
        except TypeError:  # unhashable callables
            return False

    @staticmethod
    def _chain(chain, kind, func):
        """``proceed(args, kwargs)`` of the first action of ``chain``."""
        def step(i: int):
            if i == len(chain):
                return lambda a, k: func(*a, **k)
            rest = step(i + 1)
            return lambda a, k: chain[i].apply(kind, func, a, k, rest)

        return step(0)


class ModeStack:
    """Function modes entered in a module's forward pre-hook and exited in its forward hook.

    ``push(None)`` keeps the pairing when a pre-hook enters nothing; ``pop()`` exits the latest
    entry; ``close()`` exits everything still open (a forward that raised between the two hooks).
    """

    def __init__(self):
        self._modes: list = []

    def push(self, mode: TorchFunctionMode | None) -> None:
        if mode is not None:
            mode.__enter__()
        self._modes.append(mode)

    def pop(self) -> None:
        mode = self._modes.pop() if self._modes else None
        if mode is not None:
            mode.__exit__(None, None, None)

    def close(self) -> None:
        while self._modes:
            self.pop()
