"""Errors raised while loading a model: one exception type whose message says what is wrong and where."""


class ModelLoadError(ValueError):
    """The model path, its files or its configuration cannot be used; the message names the culprit."""
