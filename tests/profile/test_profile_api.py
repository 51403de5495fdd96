"""profile_model / compare / count_flops: contract keys, per-sample counting, blocks, errors."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from trimkit.errors import CaptureError, ConfigError
from trimkit.profile import (
    blocks_from_map,
    compare,
    compare_latency,
    count_flops,
    count_params,
    measure_latency,
    profile_model,
)
from trimkit.profile.inputs import batch_from, samples_from

D = 8


class Layer(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.att = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.att(x, x, x, need_weights=False)[0]
        return self.norm(x + self.ffn(x))


def layer_flops(n, d=D):
    att = 2 * d * d * 3 * n + 4 * n * n * d + 2 * n * d * d
    return att + 2 * 2 * n * d * 2 * d


class TokenTrimmer(nn.Module):
    """Keeps the first half of the tokens; reports how many stayed."""

    trimkit_role = "trimmer"

    def __init__(self, d=D):
        super().__init__()
        self.score = nn.Linear(d, 1)
        self.kept: list[int] = []

    def forward(self, x):
        self.score(x)
        keep = max(1, x.shape[1] // 2)
        self.kept = [x.shape[1], keep]
        return x[:, :keep]

    def trimkit_stats(self):
        return {"tokens_alive": list(self.kept), "ratio": self.kept[1] / self.kept[0]}


class Net(nn.Module):
    def __init__(self, layers=2, trim=False):
        super().__init__()
        self.embed = nn.Embedding(50, D)
        self.layers = nn.ModuleList(Layer() for _ in range(layers))
        self.trimmer = TokenTrimmer() if trim else None
        self.head = nn.Linear(D, 3)

    def forward(self, ids, scale=None):
        x = self.embed(ids)
        if scale is not None:
            x = x * scale
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 0 and self.trimmer is not None:
                x = self.trimmer(x)
        return self.head(x[:, 0])


def net_flops(n, layers=2, trim=False):
    total = layer_flops(n)
    if trim:
        total += 2 * n * D  # the trimmer's scorer
        n = max(1, n // 2)
    total += (layers - 1) * layer_flops(n)
    return total + 2 * D * 3


def maker(batch_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, 50, (batch_size, 5), generator=g)}


def varied(n):
    """Samples of 3, 4, 5, ... tokens."""
    return [{"ids": torch.randint(0, 50, (1, 3 + i))} for i in range(n)]


CONTRACT = {"unit", "flops", "elementwise_flops", "params", "trimmer_params", "latency_ms",
            "peak_memory_mb", "blocks", "stats"}


@pytest.fixture
def quarter_second_clock(monkeypatch):
    """Every ``time.perf_counter()`` call of the timing module moves a quarter of a second on, so
    every timed forward lasts exactly 250 ms."""
    from trimkit.profile import timing

    ticks = iter(range(10**6))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks) * 0.25)


def test_profile_model_contract_and_per_sample_distribution(quarter_second_clock):
    torch.manual_seed(0)
    model = Net()
    report = profile_model(model, varied(5), samples=5, batch_size=3, progress=False, repeats=2,
                           warmup=1)
    assert CONTRACT <= set(report)
    json.dumps(report)
    per_sample = [net_flops(3 + s) for s in range(5)]
    assert report["unit"] == "FLOPs"
    assert report["samples"] == 5
    assert report["flops"]["mean"] == pytest.approx(np.mean(per_sample))
    assert report["flops"]["p50"] == pytest.approx(np.percentile(per_sample, 50))
    assert report["flops"]["p95"] == pytest.approx(np.percentile(per_sample, 95))
    assert report["latency_ms"] == {"batch_1": 250.0, "batch_3": 250.0}
    assert report["params"] == sum(p.numel() for p in model.parameters())
    assert report["trimmer_params"] == 0
    peaks = [count_flops(model, sample).peak_memory_bytes for sample in varied(5)]
    assert report["peak_memory_mb"] == max(peaks) / 2**20
    for block in report["blocks"]:
        assert {"path", "kind", "flops"} <= set(block)
    assert sum(b["flops"] for b in report["blocks"]) == pytest.approx(report["flops"]["mean"])


def test_batched_dict_is_split_into_samples_and_unbatched_tensors_pass_unchanged():
    ids = torch.randint(0, 50, (4, 6))
    scale = torch.full((D,), 2.0)  # no batch dimension
    samples = samples_from({"ids": ids, "scale": scale}, 8)
    assert len(samples) == 4
    assert all(s["ids"].shape == (1, 6) and s["scale"] is scale for s in samples)
    assert torch.equal(batch_from({"ids": ids, "scale": scale}, 6)["ids"][4], ids[0])
    report = profile_model(Net(), {"ids": ids, "scale": scale}, samples=8, latency=False,
                           progress=False)
    assert report["samples"] == 4
    assert report["latency_ms"] == {"batch_1": None, "batch_8": None}
    assert report["flops"]["mean"] == net_flops(6)


def test_maker_rows_become_samples_and_batches():
    calls = []

    def spy(batch_size, seed=0):
        calls.append((batch_size, seed))
        return maker(batch_size, seed)

    report = profile_model(Net(), spy, samples=3, batch_size=4, progress=False, repeats=1,
                           warmup=0)
    assert calls == [(3, 0), (4, 0)]
    assert report["samples"] == 3
    assert report["flops"]["p95"] == net_flops(5)
    assert set(report["latency_ms"]) == {"batch_1", "batch_4"}


def test_count_flops_divides_a_batch():
    model = Net()
    one = count_flops(model, {"ids": torch.randint(0, 50, (1, 5))})
    three = count_flops(model, {"ids": torch.randint(0, 50, (3, 5))})
    assert one.flops == three.flops == net_flops(5)
    assert three.batch_size == 3


def test_blocks_go_to_the_deepest_enclosing_block():
    model = Net()
    blocks = {"layers.0": "layer", "layers.0.att": "attention", "layers.1.ffn": "ffn"}
    report = count_flops(model, {"ids": torch.randint(0, 50, (1, 5))}, blocks)
    n = 5
    att = 2 * D * D * 3 * n + 4 * n * n * D + 2 * n * D * D
    ffn = 2 * 2 * n * D * 2 * D
    assert report.block("layers.0.att").flops == att
    assert report.block("layers.0").flops == ffn  # what is left of layer 0 after its attention
    assert report.block("layers.1.ffn").flops == ffn
    assert report.block("other").flops == att + 2 * D * 3  # layer 1 attention and the head
    assert sum(b.flops for b in report.blocks) == report.flops


def test_unknown_block_path_is_a_config_error():
    with pytest.raises(ConfigError, match="layers.7"):
        count_flops(Net(), {"ids": torch.randint(0, 50, (1, 4))}, {"layers.7": "layer"})


def test_blocks_from_map_duck_typed_and_dict_forms():
    layer = SimpleNamespace(path="layers.0", attention=[SimpleNamespace(path="layers.0.att")],
                            ffn=SimpleNamespace(path="layers.0.ffn"))
    as_objects = SimpleNamespace(streams=[SimpleNamespace(layers=[layer])])
    as_dict = {"streams": [{"layers": [{"path": "layers.0", "attention": [{"path": "layers.0.att"}],
                                        "ffn": None}]}]}
    assert blocks_from_map(as_objects) == {"layers.0": "layer", "layers.0.att": "attention",
                                           "layers.0.ffn": "ffn"}
    assert blocks_from_map(as_dict) == {"layers.0": "layer", "layers.0.att": "attention"}


def test_blocks_from_a_located_model_map():
    locate = pytest.importorskip("trimkit.locate").locate
    model = Net().eval()
    inputs = {"ids": torch.randint(0, 50, (2, 5))}
    blocks = blocks_from_map(locate(model, inputs))
    assert "attention" in blocks.values() and "ffn" in blocks.values()
    report = count_flops(model, inputs, blocks)
    kinds = {b.kind: 0.0 for b in report.blocks}
    for b in report.blocks:
        kinds[b.kind] += b.flops
    assert kinds["ffn"] == 2 * 2 * 2 * 5 * D * 2 * D


def test_trimmer_stats_params_and_block():
    model = Net(trim=True)
    report = profile_model(model, varied(3), samples=3, latency=False, progress=False)
    lengths = [3, 4, 5]
    assert report["flops"]["mean"] == pytest.approx(np.mean([net_flops(n, trim=True) for n in lengths]))
    assert report["trimmer_params"] == D + 1
    assert count_params(model) == (report["params"], D + 1)
    stats = report["stats"]["trimmer"]
    assert stats["tokens_alive"] == pytest.approx([4.0, np.mean([1, 2, 2])])
    assert stats["ratio"] == pytest.approx(np.mean([1 / 3, 2 / 4, 2 / 5]))
    trimmer = next(b for b in report["blocks"] if b["path"] == "trimmer")
    assert trimmer["kind"] == "trimmer"
    assert trimmer["flops"] == pytest.approx(np.mean([2 * n * D for n in lengths]))


def test_compare_reports_speedups_with_interleaved_latency(quarter_second_clock):
    torch.manual_seed(0)
    before, after = Net(layers=3), Net(layers=1)
    result = compare(before, after, varied(2), samples=2, batch_size=2, progress=False, repeats=3,
                     warmup=1)
    assert set(result) == {"before", "after", "speedup"}
    assert set(result["speedup"]) == {"flops", "latency_batch_1", "latency_batch_2"}
    expected = np.mean([net_flops(n, 3) for n in (3, 4)]) / np.mean([net_flops(n, 1) for n in (3, 4)])
    assert result["speedup"]["flops"] == pytest.approx(expected)
    for side in ("before", "after"):
        assert CONTRACT <= set(result[side])
        assert result[side]["latency_ms"] == {"batch_1": 250.0, "batch_2": 250.0}
    assert result["speedup"]["latency_batch_1"] == result["speedup"]["latency_batch_2"] == 1.0
    json.dumps(result)


class _Spy(nn.Module):
    def __init__(self, label, log, work):
        super().__init__()
        self.label, self.log = label, log
        self.fc = nn.Linear(64, 64)
        self.work = work

    def forward(self, x):
        self.log.append(self.label)
        for _ in range(self.work):
            x = self.fc(x)
        return x


def test_compare_latency_interleaves_and_divides():
    log: list[str] = []
    fast, slow = _Spy("a", log, 1), _Spy("b", log, 40)
    result = compare_latency(fast, slow, (torch.randn(16, 64),), warmup=2, repeats=5)
    assert log == ["a", "b"] * 7
    assert result["ratio"] == pytest.approx(result["a_ms"] / result["b_ms"])
    assert result["ratio"] < 1  # forty layers take longer than one


def test_measure_latency_fixes_and_restores_threads(quarter_second_clock):
    before = torch.get_num_threads()
    assert measure_latency(nn.Linear(4, 4), (torch.randn(2, 4),), threads=1, repeats=2) == 250.0
    assert torch.get_num_threads() == before


class _Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(5, 4))

    def forward(self, x):
        return self.blocks(x)


class _Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.ModuleDict({"check": _Check()})

    def forward(self, x):
        return self.inner["check"](x)


class _Check(nn.Module):
    def forward(self, x):
        raise ValueError("bad\nshape")


@pytest.mark.parametrize("run", [
    lambda m, x: count_flops(m, x),
    lambda m, x: count_flops(m, x, counter="fvcore"),
    lambda m, x: profile_model(m, x, progress=False),
    lambda m, x: measure_latency(m, x),
], ids=["count", "fvcore", "profile", "latency"])
def test_failure_inside_the_model_is_one_line_capture_error(run):
    with pytest.raises(CaptureError) as info:
        run(_Broken(), {"x": torch.randn(2, 3, 4)})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("_Broken: blocks.1 [aten.")
    assert "RuntimeError" in message and "cannot be multiplied" in message


def test_failure_in_python_code_names_the_module():
    with pytest.raises(CaptureError) as info:
        count_flops(_Raises(), {"x": torch.randn(1, 2)})
    assert str(info.value) == "_Raises: inner.check: ValueError: bad shape"


@pytest.mark.parametrize("kwargs, match", [
    ({"samples": 0}, "samples"),
    ({"batch_size": -1}, "batch_size"),
    ({"threads": 0}, "threads"),
    ({"counter": "flopz"}, "unknown counter 'flopz'"),
])
def test_bad_profile_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        profile_model(Net(), maker, progress=False, **kwargs)


class _TwoBuffers(nn.Module):
    def forward(self, x):
        a = x.repeat(1000)  # 4000 bytes
        b = a * 2  # 4000 more while a is alive
        del a
        c = b + 1  # a is gone: still 8000 live
        return c.sum()


def test_peak_memory_counts_live_tensor_bytes():
    report = count_flops(_TwoBuffers(), (torch.ones(1),))
    assert 8000 <= report.peak_memory_bytes <= 8000 + 64


class _UsesHelper(nn.Module):
    def __init__(self, helper):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.helpers = [helper]  # not a child: the helper lives at the root

    def forward(self, x):
        return self.fc(self.helpers[0](x))


class _HookedNet(nn.Module):
    """A trimmer kept in a container at the root but run from a layer's hook; a shared helper."""

    def __init__(self):
        super().__init__()
        self.helper = nn.Linear(D, D)
        self.layers = nn.ModuleList([_UsesHelper(self.helper), _UsesHelper(self.helper)])
        self.trimmers = nn.ModuleList([TokenTrimmer()])
        self.layers[0].register_forward_hook(lambda m, a, out: self.trimmers[0](out))
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_modules_are_charged_to_their_own_block_else_to_their_caller():
    model = _HookedNet()
    blocks = {"layers.0": "layer", "layers.1": "layer"}
    report = count_flops(model, (torch.randn(1, 6, D),), blocks)
    n, kept = 6, 3
    assert report.block("trimmers").kind == "trimmer"  # the container is named so
    assert report.block("trimmers").flops == 2 * n * D  # run from layers.0's hook, charged here
    assert report.block("layers.0").flops == 2 * (2 * n * D * D)  # fc and the shared helper
    assert report.block("layers.1").flops == 2 * (2 * kept * D * D)
    assert report.block("other").flops == 2 * kept * D * 2  # the head


def test_trimmer_shortcuts_are_charged_to_the_trimmer_rows():
    """The trimmers' inference shortcuts skip module calls; their FLOPs still land on their own rows,
    and every row of the total is somewhere."""
    from trimkit.backbones import load_backbone
    from trimkit.locate import locate
    from trimkit.passes import apply_
    from trimkit.passes.smarttrim import SmartTrimTokensConfig
    from trimkit.passes.smarttrim_heads import SmartTrimHeadsConfig
    from trimkit.profile.counter import FlopRecorder

    bb = load_backbone("vilt-vqa-tiny")
    inputs = bb.example_inputs(1)
    model_map = locate(bb.model, inputs, hints=bb.hints)
    torch.manual_seed(0)
    apply_(bb.model, [SmartTrimTokensConfig(threshold=0.5), SmartTrimHeadsConfig(threshold=0.5)],
           model_map=model_map, inputs=inputs, hints=bb.hints)
    blocks = blocks_from_map(model_map)
    report = count_flops(bb.model, inputs, blocks)
    rows = {b.path: b.flops for b in report.blocks}
    assert sum(rows.values()) == report.flops
    with torch.inference_mode(), FlopRecorder(bb.model, blocks) as plain:  # the shortcuts as they run
        bb.model.eval()(**inputs)
    assert report.flops == sum(plain.flops.values())
    for path in ("trimkit_token_trimmers", "trimkit_head_trimmers"):
        assert plain.flops[path] == 0 and rows[path] > 0  # charged to the calling layer before, own row now


def test_peak_memory_is_the_largest_set_of_live_activations():
    """Linear(4, 8) -> ReLU -> Linear(8, 3): the first output and the ReLU output (8 floats each) are
    alive together, 64 bytes per row; the last output (3 floats) comes after the first is freed."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert count_flops(model, (torch.randn(1, 4),)).peak_memory_bytes == 64
    assert count_flops(model, (torch.randn(5, 4),)).peak_memory_bytes == 5 * 64
    report = profile_model(model, [{"input": torch.randn(1, 4)}], samples=1, batch_size=2, progress=False, repeats=1,
                           warmup=0)
    assert report["peak_memory_mb"] == 64 / 2**20


def test_placement_of_names_the_bulk_dtype_not_the_trimmers():
    from torch import nn

    from trimkit.profile.api import placement_of
    from trimkit.profile.timing import cuda_devices

    model = nn.Sequential(nn.Linear(16, 16).to(torch.bfloat16), nn.Linear(2, 1))
    assert placement_of(model) == ("cpu", "bfloat16")
    assert placement_of(nn.ReLU()) == ("cpu", "float32")
    assert cuda_devices(model) == []
