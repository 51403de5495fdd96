"""trimkit.passes: compression passes (config dataclass + registered handler), recipes and the runner.

>>> from trimkit.passes import Int8DynamicConfig, apply_, remove_
>>> report = apply_(model, [Int8DynamicConfig()], inputs=example_inputs)   # in place
>>> remove_(model)                                                          # undo, newest first
"""

from trimkit.passes.base import AppliedPass, PassConfig, PassContext, PassResult, trainable_parameters
from trimkit.passes.int8 import Int8DynamicConfig, Int8DynamicLinear
from trimkit.passes.manager import ApplyReport, PassManager, applied_passes, apply_, apply_recipe, remove_
from trimkit.passes.registry import (
    config_from_dict,
    config_to_dict,
    parse_recipe,
    recipe_to_toml,
    register_pass,
    registered_passes,
)

__all__ = [
    "PassConfig",
    "PassResult",
    "PassContext",
    "AppliedPass",
    "register_pass",
    "registered_passes",
    "config_to_dict",
    "config_from_dict",
    "parse_recipe",
    "recipe_to_toml",
    "PassManager",
    "ApplyReport",
    "apply_",
    "remove_",
    "apply_recipe",
    "applied_passes",
    "trainable_parameters",
    "Int8DynamicConfig",
    "Int8DynamicLinear",
]
