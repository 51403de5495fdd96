"""trimkit: input-adaptive trimming for vision-language transformers."""
__version__ = "0.1.0"

__all__ = ["load", "load_backbone", "__version__"]


def load(path):
    """Rebuild a folder written by ``trimkit apply`` / ``trimkit train``: a Backbone whose ``.model``
    gives the saved outputs (``.example_inputs(n)`` and ``.task`` come with it)."""
    from trimkit.backbones import load_saved  # imported on use: `import trimkit` stays light

    return load_saved(path)


def load_backbone(ref, **kwargs):
    """A model reference (registry name, hub id, folder, ``file.py:factory``) as a Backbone; see
    `trimkit.backbones.load_backbone`."""
    from trimkit.backbones import load_backbone as _load

    return _load(ref, **kwargs)
