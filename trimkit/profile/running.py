"""Running a model for measurement: eval mode, thread count, and failures as CaptureError."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch

from trimkit.errors import CaptureError, TrimkitError
from trimkit.profile.counter import FlopRecorder
from trimkit.profile.inputs import Inputs, call_model

__all__ = ["model_name", "eval_mode", "fixed_threads", "capture_error", "run_forward",
           "locate_failure", "collect_stats"]


def model_name(model: torch.nn.Module) -> str:
    return type(model).__name__


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside, each module's own training flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def capture_error(name: str, path: str, op: str | None, exc: BaseException) -> CaptureError:
    """``"<model>: <module path> [<op>]: <message>"`` on one line."""
    where = path or "<top>"
    if op:
        where = f"{where} [{op}]"
    message = _one_line(str(exc)) or type(exc).__name__
    return CaptureError(f"{name}: {where}: {type(exc).__name__}: {message}")


def locate_failure(model: torch.nn.Module, inputs: Inputs, name: str,
                   exc: BaseException) -> CaptureError:
    """Rerun a failed forward under the recorder to name the module and op where it fails."""
    recorder = FlopRecorder(model, {})
    try:
        with recorder:
            call_model(model, inputs)
    except Exception as again:  # the same failure, now located
        path, op = recorder.failure or (recorder.stack.path, None)
        return capture_error(name, path, op, again)
    return capture_error(name, "", None, exc)


def run_forward(model: torch.nn.Module, inputs: Inputs, name: str) -> Any:
    """Call the model; a failure inside it becomes a one-line CaptureError."""
    try:
        return call_model(model, inputs)
    except TrimkitError:
        raise
    except Exception as exc:
        raise locate_failure(model, inputs, name, exc) from exc


def collect_stats(model: torch.nn.Module) -> dict[str, Mapping[str, Any]]:
    """``trimkit_stats()`` of every module that has one, by module path."""
    found = {}
    for path, module in model.named_modules():
        method = getattr(module, "trimkit_stats", None)
        if callable(method):
            found[path] = dict(method())
    return found
