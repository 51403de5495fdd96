"""trimkit.backbones: model references -> models with a task adapter and example inputs.

>>> bb = load_backbone("clip-tiny")
>>> outputs = bb.model(**bb.example_inputs(2))
>>> bb.task.logits(outputs).shape
torch.Size([2, 2])
"""

from trimkit.backbones.base import TASK_KINDS, Backbone, TaskAdapter
from trimkit.backbones.families import TINY_CONFIGS
from trimkit.backbones.inputs import ImageSpec, InputMaker, RepeatBatch, TextSpec
from trimkit.backbones.trained import list_trained, trained_info
from trimkit.backbones.registry import backbone_for_model, list_backbones, load_backbone, load_saved, tiny_config

__all__ = [
    "Backbone",
    "TaskAdapter",
    "TASK_KINDS",
    "load_backbone",
    "load_saved",
    "list_backbones",
    "list_trained",
    "trained_info",
    "backbone_for_model",
    "tiny_config",
    "TINY_CONFIGS",
    "InputMaker",
    "TextSpec",
    "ImageSpec",
    "RepeatBatch",
]
