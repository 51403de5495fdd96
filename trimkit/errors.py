"""Exceptions that the CLI turns into one-line messages."""

__all__ = ["TrimkitError", "UnknownModelError", "CaptureError", "ConfigError", "DataError"]


class TrimkitError(Exception):
    """Base class: an error a user can act on; the CLI prints it as one line."""


class UnknownModelError(TrimkitError, ValueError):
    """A model reference that names nothing trimkit can load."""


class CaptureError(TrimkitError, RuntimeError):
    """The recorded forward failed inside the model."""


class ConfigError(TrimkitError, ValueError):
    """A bad recipe, pass config or command-line option."""


class DataError(TrimkitError, ValueError):
    """A data spec that cannot be read."""
