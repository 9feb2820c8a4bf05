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


class StageFailedError(TridentError):
    """A stage kept failing because its replicas died, beyond the configured retries."""

    http_status = 503

    def __init__(self, stage: str, attempts: int, cause: BaseException | None = None):
        self.stage, self.attempts, self.retry_after_s = stage, attempts, 1.0
        why = f": {type(cause).__name__}" if cause is not None else ""
        super().__init__(f"the {stage} stage failed {attempts} time(s) because its replica died{why}; "
                         "the request was not finished, retry it")


class RequestTimedOutError(TridentError):
    """The request did not finish within the server's request timeout; its work was cancelled."""

    http_status = 504

    def __init__(self, request_id: str, timeout_s: float):
        super().__init__(f"request {request_id!r} did not finish within {timeout_s:g} s and was cancelled")


class UnknownRequestError(TridentError, KeyError):
    """No request with this id is known (never submitted, already finished, or forgotten)."""

    http_status = 404

    def __init__(self, request_id: str):
        super().__init__(f"no active request {request_id!r}")

    def __str__(self) -> str:
        return self.args[0]


class NotFoundError(TridentError, KeyError):
    """No such resource (a video job, a stored file); `field` names the path parameter."""

    http_status = 404

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)

    def __str__(self) -> str:
        return self.args[0]


class UnknownAdapterError(NotFoundError):
    """A request names a LoRA adapter the server's config does not declare (`loras`)."""

    def __init__(self, name: str, known: list[str] | tuple[str, ...] = ()):
        hint = f"; known adapters: {', '.join(sorted(known))}" if known else "; no adapters are configured"
        super().__init__("lora", f"unknown LoRA adapter {name!r}{hint}")
        self.adapter = name


class ConflictError(TridentError):
    """The resource is not in a state that allows this (e.g. the content of an unfinished video,
    deleting a finished one, an idempotency key reused for another request)."""

    http_status = 409

    def __init__(self, field: str | None, message: str):
        self.field = field
        super().__init__(message)


class GoneError(TridentError):
    """The resource existed but has expired and was removed."""

    http_status = 410

    def __init__(self, field: str | None, message: str):
        self.field = field
        super().__init__(message)
