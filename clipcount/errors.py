"""Errors meant for people: each names the thing that is wrong and what to do about it."""


class ClipCountError(Exception):
    """Base of every error clipcount raises on purpose."""


class ConfigError(ClipCountError, ValueError):
    """A setting, flag or config file is invalid."""


class DataError(ClipCountError, ValueError):
    """A dataset file is missing, malformed or inconsistent."""


class ImageError(ClipCountError, ValueError):
    """An image cannot be read or is unsuitable (too small, too large, not an image)."""


class PromptError(ClipCountError, ValueError):
    """A text prompt is empty or otherwise unusable."""


class CheckpointError(ClipCountError, ValueError):
    """A weights file is missing, of the wrong kind, or does not match the model."""
