import functools

import pytest
import torch

from trimkit.backbones import load_backbone


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _cached(name: str):
    return load_backbone(name)


@pytest.fixture
def tiny():
    """A shared, read-only tiny backbone by name (build a fresh one to mutate it)."""
    return _cached
