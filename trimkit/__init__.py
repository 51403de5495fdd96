"""trimkit: input-adaptive trimming for vision-language transformers."""
__version__ = "0.1.0"
