"""Exception types people see.

Every error raised on purpose by segllm-jax derives from :class:`SegLLMError` and carries one
sentence that says what was wrong and what to do. The CLI prints that sentence instead of a
traceback (``--debug`` shows the traceback).
"""


class SegLLMError(Exception):
    """Base class of all errors segllm-jax raises on purpose."""


class ConfigError(SegLLMError):
    """A configuration is inconsistent or cannot be read."""


class CheckpointError(SegLLMError):
    """A checkpoint cannot be read or does not match the model (names every offending key)."""


class ConversionError(CheckpointError):
    """A PyTorch checkpoint cannot be converted: missing, extra, mis-shaped or mistyped keys."""


class TokenizerError(SegLLMError):
    """The tokenizer is missing, inconsistent with the model, or lacks SegLLM's added tokens."""


class InputError(SegLLMError):
    """A user input (image, text, reference tag, mask) cannot be used."""
