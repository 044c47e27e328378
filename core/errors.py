"""Exceptions whose messages are written for the person using the tool."""
from __future__ import annotations


class BreastXAIError(Exception):
    """Base class for every error the project raises on purpose."""


class InvalidImageError(BreastXAIError, ValueError):
    """The file cannot be used as an image; the message says why and what to do."""


class CheckpointError(BreastXAIError, RuntimeError):
    """A checkpoint bundle is missing, incomplete, tampered with or inconsistent."""


class CheckpointNotFoundError(BreastXAIError, LookupError):
    """No installed checkpoint has the requested name (or none is installed)."""


class DatasetError(BreastXAIError, ValueError):
    """A dataset folder does not have the expected layout or content."""


class WeightsUnavailableError(BreastXAIError, RuntimeError):
    """Backbone weights were requested but cannot be obtained (e.g. offline)."""


class ConfigError(BreastXAIError, ValueError):
    """Training options that cannot work together; the message names the options to change."""
