"""trimkit: input-adaptive trimming for vision-language transformers."""
__version__ = "0.1.0"


def load(path):
    """Rebuild a folder written by ``trimkit apply`` / ``trimkit train``: a Backbone whose ``.model``
    gives the saved outputs (``.example_inputs(n)`` and ``.task`` come with it)."""
    from trimkit.io import load_folder

    return load_folder(path)


__all__ = ["load", "__version__"]
