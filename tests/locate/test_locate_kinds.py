"""The locator finds sites through the attention-kind registry: a new kind is one registered class."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trimkit.attention import AttentionKind, register_kind, registry
from trimkit.locate import locate


@torch.library.custom_op("trimkit_tests::attend", mutates_args=())
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An opaque attention kernel, as a third-party fused attention would be."""
    return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v


@attend.register_fake
def _(q, k, v):
    return torch.empty_like(q)


class Block(nn.Module):
    def __init__(self, width=16, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        b, n, d = x.shape

        def split(t):
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        a = attend(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = x + self.o(a.transpose(1, 2).reshape(b, n, d))
        return x + self.down(F.gelu(self.up(x)))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.layers = nn.ModuleList(Block() for _ in range(2))

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture
def scratch_registry(monkeypatch):
    for name in ("_KINDS", "_BY_FUNCTION", "_BY_OP", "_BY_NAME"):
        monkeypatch.setattr(registry, name, dict(getattr(registry, name)))


def test_a_registered_kind_is_located(scratch_registry):
    model, inputs = Model().eval(), {"input_ids": torch.randint(0, 20, (2, 6))}
    assert locate(model, inputs).sites() == []

    @register_kind
    class Opaque(AttentionKind):
        name = "opaque"
        graph_ops = frozenset({torch.ops.trimkit_tests.attend.default})
        pattern = "qkv"

    sites = locate(model, inputs).sites()
    assert [(s.path, s.op, s.heads, s.head_dim, s.q, s.o) for s in sites] == [
        (f"layers.{i}", "opaque", 4, 4, f"layers.{i}.q", f"layers.{i}.o") for i in range(2)]


def test_a_kind_needs_a_known_pattern(scratch_registry):
    class Odd(AttentionKind):
        name = "odd"
        graph_ops = frozenset({torch.ops.aten.mm.default})
        pattern = "somewhere"

    with pytest.raises(ValueError, match="pattern must be one of"):
        register_kind(Odd)
