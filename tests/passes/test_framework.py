"""Pass framework: typed configs, registry and entry points, recipes, ordering, roll-back, remove_."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import sys
import typing
from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trimkit.errors import ConfigError, TrimkitError
from trimkit.passes import (
    Int8DynamicConfig,
    PassConfig,
    PassContext,
    PassManager,
    PassResult,
    applied_passes,
    apply_,
    apply_recipe,
    config_from_dict,
    config_to_dict,
    parse_recipe,
    recipe_to_toml,
    register_pass,
    registered_passes,
    remove_,
    trainable_parameters,
)
from trimkit.passes import registry as registry_mod
from trimkit.passes.base import config_fields


# ----------------------------------------------------------------------------------------------
# Dummy passes (registered per test by the `dummies` fixture, then removed)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScaleConfig(PassConfig):
    """Multiplies one Linear's weight; tagged as a trimming pass."""

    name: ClassVar[str] = "test.scale"
    tags: ClassVar[tuple[str, ...]] = ("trim",)
    factor: float = 2.0
    target: str = "layers.0"

    def validate(self) -> None:
        if not 0 < self.factor <= 10:
            raise ConfigError(f"field 'factor' must be in (0, 10], got {self.factor}")


@dataclass(frozen=True)
class NeedsScaleConfig(PassConfig):
    name: ClassVar[str] = "test.needs_scale"
    requires: ClassVar[tuple[str, ...]] = ("test.scale",)


@dataclass(frozen=True)
class FailConfig(PassConfig):
    name: ClassVar[str] = "test.fail"
    as_config_error: bool = False


@dataclass(frozen=True)
class TypesConfig(PassConfig):
    name: ClassVar[str] = "test.types"
    ratio: float = 0.5
    count: int = 3
    flag: bool = False
    label: str = "x"
    mode: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1, 2)
    limit: float | None = None


@dataclass(frozen=True)
class ContextConfig(PassConfig):
    name: ClassVar[str] = "test.context"


class Trimmer(nn.Module):
    trimkit_role = "trimmer"

    def __init__(self, width: int):
        super().__init__()
        self.score = nn.Linear(width, 1)


def scale_pass(model, model_map, config: ScaleConfig) -> PassResult:
    layer = model.get_submodule(config.target)
    old = layer.weight.data.clone()
    layer.weight.data.mul_(config.factor)
    return PassResult(model, {"scaled": config.target}, undo=lambda: layer.weight.data.copy_(old))


def needs_scale_pass(model, model_map, config) -> PassResult:
    model.trimmer = Trimmer(4)

    def undo():
        del model.trimmer

    return PassResult(model, {}, undo=undo, trainable=True)


def fail_pass(model, model_map, config: FailConfig) -> PassResult:
    if config.as_config_error:
        raise ConfigError("threshold too high")
    raise RuntimeError("boom\nsecond line")


def types_pass(model, model_map, config) -> PassResult:
    return PassResult(model, {})


SEEN_CONTEXTS: list[PassContext] = []


def context_pass(model, model_map, config, context: PassContext) -> PassResult:
    SEEN_CONTEXTS.append(context)
    return PassResult(model, {"n_applied": len(context.applied)}, undo=lambda: None)


DUMMIES = [(ScaleConfig, scale_pass), (NeedsScaleConfig, needs_scale_pass), (FailConfig, fail_pass),
           (TypesConfig, types_pass), (ContextConfig, context_pass)]


@pytest.fixture
def clean_registry():
    registered_passes()  # built-ins and entry points loaded before the snapshot
    saved, loaded = dict(registry_mod._REGISTRY), dict(registry_mod._loaded)
    yield registry_mod._REGISTRY
    registry_mod._REGISTRY.clear()
    registry_mod._REGISTRY.update(saved)
    registry_mod._loaded.update(loaded)


@pytest.fixture
def dummies(clean_registry):
    for cls, handler in DUMMIES:
        register_pass(cls)(handler)
    return clean_registry


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    def forward(self, x):
        return self.layers(x)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


X = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------
# Round trips over every registered pass
# ----------------------------------------------------------------------------------------------
def _sample(tp):
    origin = typing.get_origin(tp)
    if tp is bool:
        return False
    if tp is int:
        return 1
    if tp is float:
        return 0.5
    if tp is str:
        return ""
    if origin is Literal:
        return typing.get_args(tp)[0]
    if origin is tuple:
        return ()
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return _sample(args[0]) if args else None


def example_config(cls: type[PassConfig]) -> PassConfig:
    """The default config; required fields get a plain value of their type."""
    required = {f.name: _sample(config_fields(cls)[f.name]) for f in dataclasses.fields(cls)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    return cls(**required)


@pytest.mark.parametrize("name", sorted(registered_passes()))
def test_every_registered_config_round_trips(name):
    cls = registered_passes()[name]
    config = example_config(cls)
    saved = config_to_dict(config)
    assert saved["_type"] == name and saved["_version"] == cls.version
    assert config_from_dict(json.loads(json.dumps(saved))) == config
    assert parse_recipe(recipe_to_toml([config])) == [config]
    assert hash(config) == hash(config_from_dict(saved))


def test_dummy_round_trip_keeps_types(dummies):
    config = TypesConfig(ratio=1, sizes=[3, 4], limit=2)
    assert type(config.ratio) is float and config.sizes == (3, 4) and type(config.limit) is float
    back = parse_recipe(recipe_to_toml([config, ScaleConfig(factor=3.0)]))
    assert back == [config, ScaleConfig(factor=3.0)]
    assert type(back[0].ratio) is float


@settings(max_examples=25, deadline=None)
@given(label=st.text(max_size=20), ratio=st.floats(allow_nan=False), count=st.integers(-2**40, 2**40),
       sizes=st.lists(st.integers(0, 9), max_size=4))
def test_toml_writer_round_trips_any_values(label, ratio, count, sizes):
    registry_mod._REGISTRY.setdefault(TypesConfig.name, registry_mod._Entry(TypesConfig, types_pass, False))
    try:
        config = TypesConfig(label=label, ratio=ratio, count=count, sizes=tuple(sizes))
        assert parse_recipe(recipe_to_toml([config])) == [config]
    finally:
        registry_mod._REGISTRY.pop(TypesConfig.name, None)


# ----------------------------------------------------------------------------------------------
# Field checking and recipe errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field, expected", [
    ({"flag": 1}, "flag", "must be bool, got int 1"),
    ({"count": True}, "count", "must be int, got bool True"),
    ({"count": 1.5}, "count", "must be int, got float 1.5"),
    ({"ratio": "0.5"}, "ratio", "must be float, got str '0.5'"),
    ({"mode": "c"}, "mode", "must be one of 'a', 'b', got str 'c'"),
    ({"sizes": [1, "2"]}, "sizes", "must be list of int"),
    ({"limit": "x"}, "limit", "must be float or None"),
])
def test_ill_typed_fields_are_config_errors(kwargs, field, expected):
    with pytest.raises(ConfigError) as info:
        TypesConfig(**kwargs)
    message = str(info.value)
    assert f"'test.types'" in message and f"field {field!r}" in message and expected in message


def test_range_check_runs_in_post_init():
    with pytest.raises(ConfigError, match=r"factor.*got 11"):
        ScaleConfig(factor=11)


def _one_line_error(text) -> str:
    with pytest.raises(ConfigError) as info:
        parse_recipe(text)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_recipe_unknown_pass_lists_registered(dummies):
    message = _one_line_error('[[pass]]\nname = "int8.dynamic"\n[[pass]]\nname = "int8.dynamc"\n')
    assert "'int8.dynamc'" in message and "#2" in message
    assert "registered passes:" in message and "int8.dynamic" in message and "test.scale" in message


def test_recipe_unknown_field_lists_valid_ones(dummies):
    message = _one_line_error('[[pass]]\nname = "test.scale"\nfactr = 2.0\n')
    assert "'test.scale'" in message and "'factr'" in message
    assert "valid fields: factor (float), target (str)" in message


def test_recipe_bad_type_and_range(dummies):
    message = _one_line_error('[[pass]]\nname = "test.scale"\nfactor = "big"\n')
    assert "'test.scale' (pass #1)" in message and "field 'factor' must be float, got str 'big'" in message
    message = _one_line_error('[[pass]]\nname = "test.scale"\nfactor = 20\n')
    assert "'test.scale' (pass #1)" in message and "factor" in message and "20" in message
    assert parse_recipe('[[pass]]\nname = "test.scale"\nfactor = 3\n') == [ScaleConfig(factor=3.0)]


@pytest.mark.parametrize("text, expected", [
    ("[[pass]\nname = 1", "invalid TOML"),
    ('[[pass]]\nfactor = 2.0\n', "needs a string 'name'"),
    ('[[pass]]\nname = "test.scale"\n[extra]\nx = 1\n', "unknown top-level key 'extra'"),
    ('pass = 3\n', "array of tables"),
])
def test_recipe_structure_errors(dummies, text, expected):
    assert expected in _one_line_error(text)


def test_recipe_from_path_and_missing_path(dummies, tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[pass]]\nname = "test.scale"\nfactor = 4.0\n')
    assert parse_recipe(path) == parse_recipe(str(path)) == [ScaleConfig(factor=4.0)]
    assert parse_recipe("") == []
    assert "not found" in _one_line_error(str(tmp_path / "missing.toml"))


def test_config_from_dict_allowlist_and_versions(dummies):
    with pytest.raises(ConfigError, match="unknown pass 'os.system'.*registered passes"):
        config_from_dict({"_type": "os.system", "_version": 1, "_data": {}})
    with pytest.raises(ConfigError, match="version 2 is newer"):
        config_from_dict({"_type": "test.scale", "_version": 2, "_data": {}})
    with pytest.raises(ConfigError, match="cannot read config version 0"):
        config_from_dict({"_type": "test.scale", "_version": 0, "_data": {}})


def test_register_pass_rejects_bad_configs(clean_registry):
    class NotDataclass(PassConfig):
        name: ClassVar[str] = "test.nd"
        x: int = 1

    @dataclass(frozen=True)
    class Unnamed(PassConfig):
        x: int = 1

    @dataclass(frozen=True)
    class DictField(PassConfig):
        name: ClassVar[str] = "test.dict"
        table: dict = dataclasses.field(default_factory=dict)

    for cls, message in [(int, "needs a PassConfig"), (NotDataclass, "frozen dataclass"), (Unnamed, "name"), (DictField, "recipes cannot express")]:
        with pytest.raises(TypeError, match=message):
            register_pass(cls)

    @dataclass(frozen=True)
    class Clash(PassConfig):
        name: ClassVar[str] = "int8.dynamic"

    with pytest.raises(TrimkitError, match="taken by"):
        register_pass(Clash)(types_pass)


# ----------------------------------------------------------------------------------------------
# Ordering, failures, undo
# ----------------------------------------------------------------------------------------------
def test_requires_is_checked_before_anything_runs(dummies):
    model = tiny_model()
    before = model(X)
    with pytest.raises(ConfigError) as info:
        PassManager().run(model, None, [NeedsScaleConfig(), ScaleConfig()])
    assert "'test.needs_scale' (#1) requires 'test.scale'" in str(info.value)
    assert torch.equal(model(X), before) and applied_passes(model) == []
    results = PassManager().run(model, None, [ScaleConfig(), NeedsScaleConfig()])
    assert [r.trainable for r in results] == [False, True]


def test_forbids_after_matches_tags_and_applied_passes(dummies):
    with pytest.raises(ConfigError) as info:
        PassManager().run(tiny_model(), None, [Int8DynamicConfig(), ScaleConfig()])
    assert "'test.scale' (#2) cannot run after 'int8.dynamic' (#1)" in str(info.value)
    assert "'@trim'" in str(info.value)
    model = tiny_model()
    PassManager().run(model, None, [Int8DynamicConfig(skip="")])
    with pytest.raises(ConfigError, match="already applied"):
        PassManager().run(model, None, [ScaleConfig()])


def test_failure_names_the_pass_and_undoes_those_before(dummies):
    model = tiny_model()
    before = model(X)
    with pytest.raises(TrimkitError) as info:
        PassManager().run(model, None, [ScaleConfig(), ScaleConfig(target="layers.2"), FailConfig()])
    message = str(info.value)
    assert message.startswith("pass 'test.fail' (#3) failed: RuntimeError: boom;")
    assert "passes run before it: test.scale, test.scale (undone)" in message and "\n" not in message
    assert torch.equal(model(X), before) and applied_passes(model) == []
    with pytest.raises(ConfigError, match=r"'test.fail' \(#1\) failed: threshold too high; no passes ran"):
        PassManager().run(model, None, [FailConfig(as_config_error=True)])


def test_remove_restores_outputs_exactly(dummies):
    model = tiny_model()
    before = model(X)
    keys = list(model.state_dict())
    report = apply_(model, [ScaleConfig(), NeedsScaleConfig(), Int8DynamicConfig(skip="")], model_map={})
    assert report.trainable and not torch.equal(model(X), before)
    assert [type(a.config).name for a in applied_passes(model)] == ["test.scale", "test.needs_scale", "int8.dynamic"]
    removed = remove_(model)
    assert [type(c).name for c in removed] == ["test.scale", "test.needs_scale", "int8.dynamic"]
    assert torch.equal(model(X), before) and list(model.state_dict()) == keys
    assert applied_passes(model) == [] and not hasattr(model, "_trimkit_map")


def test_remove_refuses_passes_without_undo(dummies):
    model = tiny_model()
    apply_(model, Int8DynamicConfig(skip="", keep_float=False), model_map={})
    with pytest.raises(TrimkitError, match="int8.dynamic cannot be undone"):
        remove_(model)


def test_context_handlers_get_inputs_hints_and_applied(dummies):
    SEEN_CONTEXTS.clear()
    model = tiny_model()
    inputs = {"x": X}
    apply_(model, [ScaleConfig(), ContextConfig()], model_map={}, inputs=inputs, hints={"family": "toy"})
    (context,) = SEEN_CONTEXTS
    assert context.inputs is inputs and context.hints == {"family": "toy"} and not context.restoring
    assert [type(a.config).name for a in context.applied] == ["test.scale"]


def test_apply_needs_map_or_inputs(dummies):
    with pytest.raises(ConfigError, match="model_map or example inputs"):
        apply_(tiny_model(), [ScaleConfig()])


def test_apply_recipe_text(dummies):
    model = tiny_model()
    weight = model.layers[0].weight.detach().clone()
    results = apply_recipe(model, '[[pass]]\nname = "test.scale"\nfactor = 3\n', {})
    assert results[0].report == {"scaled": "layers.0"}
    assert torch.allclose(model.layers[0].weight, 3 * weight)


def test_trainable_parameters_are_the_trimmers():
    model = tiny_model()
    model.t1 = Trimmer(4)
    model.t2 = Trimmer(4)
    assert trainable_parameters(model) == [*model.t1.parameters(), *model.t2.parameters()]
    assert trainable_parameters(tiny_model()) == []


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------
PLUGIN = '''
from dataclasses import dataclass
from typing import ClassVar
from trimkit.passes import PassConfig, PassResult, register_pass

@dataclass(frozen=True)
class NoopConfig(PassConfig):
    name: ClassVar[str] = "plugin.noop"
    strength: float = 1.0

@register_pass(NoopConfig)
def noop(model, model_map, config):
    return PassResult(model, {"strength": config.strength}, undo=lambda: None)
'''


def test_entry_point_plugins_register(clean_registry, tmp_path, monkeypatch):
    (tmp_path / "tk_plugin_mod.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [importlib.metadata.EntryPoint("noop", "tk_plugin_mod", "trimkit.passes"),
           importlib.metadata.EntryPoint("broken", "tk_missing_plugin_mod", "trimkit.passes")]

    def fake_entry_points(**kw):
        assert kw == {"group": "trimkit.passes"}
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    assert "plugin.noop" not in registered_passes()
    with pytest.warns(UserWarning, match="'broken'"):
        registry_mod.reload_plugins()
    assert "plugin.noop" in registered_passes()
    (config,) = parse_recipe('[[pass]]\nname = "plugin.noop"\nstrength = 2\n')
    assert PassManager().run(tiny_model(), None, [config])[0].report == {"strength": 2.0}
    sys.modules.pop("tk_plugin_mod", None)
