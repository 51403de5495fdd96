import textwrap
import uuid

import pytest
import torch

from trimkit.backbones import Backbone, list_backbones, load_backbone
from trimkit.errors import ConfigError, UnknownModelError

PAIR_FACTORY = '''
import torch

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)

    def forward(self, x, scale):
        return {"y": self.proj(x) * scale, "x": x}

def make():
    torch.manual_seed(0)
    return Tiny().train(), {"x": torch.randn(2, 4), "scale": torch.tensor(2.0)}

def wrong():
    return 42
'''


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "my_factory.py"
    path.write_text(PAIR_FACTORY)
    return path


def test_file_factory_pair_becomes_a_features_backbone(factory_file):
    bb = load_backbone(f"{factory_file}:make")
    assert bb.source == "factory" and bb.task.kind == "features" and not bb.model.training
    inputs = bb.example_inputs(5, text_len=3, image_size=64)
    assert inputs["x"].shape == (5, 4) and inputs["scale"].shape == ()
    assert torch.equal(inputs["x"][2], inputs["x"][0])
    outputs = bb.model(**bb.example_inputs(1))
    logits = bb.task.logits(outputs)
    torch.testing.assert_close(logits, outputs["y"])
    assert logits.shape == (1, 3)
    loss = bb.task.loss(outputs, {"labels": torch.zeros(1, 3)})
    assert torch.isfinite(loss) and loss.requires_grad


def test_module_factory_returning_a_backbone(tmp_path, monkeypatch):
    package = f"pkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "models.py").write_text(textwrap.dedent('''
        from trimkit.backbones import load_backbone

        def build():
            backbone = load_backbone("siglip-tiny")
            backbone.name = "my-siglip"
            return backbone
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    bb = load_backbone(f"{package}.models:build")
    assert isinstance(bb, Backbone)
    assert bb.name == "my-siglip" and bb.source == "factory" and bb.task.kind == "contrastive"
    with torch.no_grad():
        assert bb.task.logits(bb.model(**bb.example_inputs(2))).shape == (2, 2)


def test_factory_with_a_wrong_return_is_a_config_error(factory_file):
    with pytest.raises(ConfigError, match="int"):
        load_backbone(f"{factory_file}:wrong")


@pytest.mark.parametrize("ref", ["{file}:missing_function", "{dir}/nope.py:make", "no_such_pkg_xyz.models:make"])
def test_factory_reference_to_nothing_is_unknown(factory_file, ref):
    ref = ref.format(file=factory_file, dir=factory_file.parent)
    with pytest.raises(UnknownModelError) as info:
        load_backbone(ref)
    assert "\n" not in str(info.value) and repr(ref) in str(info.value)
    assert all(name in str(info.value) for name in list_backbones())
