"""Typed errors. Everything a user can get wrong raises a subclass of `TridentError`.

The HTTP layer maps them to status codes (`http_status`), the CLI to a one-line message.
"""
from __future__ import annotations


class TridentError(Exception):
    """Base class of every error trident_rs raises on purpose."""

    http_status = 500


class InvalidRequestError(TridentError, ValueError):
    """A request field is out of range or of the wrong kind. Raised before any compute."""

    http_status = 422

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class UnknownModelError(TridentError, KeyError):
    """The model name is not in the registry."""

    http_status = 404

    def __init__(self, model: str, known: list[str] | tuple[str, ...] = ()):
        self.model = model
        hint = f"; known models: {', '.join(sorted(known))}" if known else ""
        super().__init__(f"unknown model {model!r}{hint}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class ProfileError(TridentError, ValueError):
    """A profile file is malformed, or has no data for what was asked."""


class ConfigError(TridentError, ValueError):
    """A deployment or cluster configuration cannot work (e.g. asks for GPUs that are not there)."""


class OverloadedError(TridentError):
    """Admission control refused the request; retry later."""

    http_status = 429

    def __init__(self, message: str, retry_after_s: float = 1.0):
        self.retry_after_s = retry_after_s
        super().__init__(message)
