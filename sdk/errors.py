"""Typed errors. Every error names what is wrong and where.

Bad input raises ``InvalidRequestError`` (a ``ValueError``) whose ``field`` is a path
into the request, e.g. ``messages[3].tool_calls[0].function.arguments``; a bad rule
file raises ``RuleFileError`` with the file, line and column. Remote failures are split by
what a caller can do about them (retry later, fix the request, give up).
"""

from __future__ import annotations


class MilliwattError(Exception):
    """Base class of every error milliwatt raises on purpose."""


class InvalidRequestError(MilliwattError, ValueError):
    """A step's messages, tools or options are malformed."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class ConfigError(MilliwattError, ValueError):
    """The configuration is invalid; ``where`` names the file or setting."""

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")


class RuleFileError(MilliwattError, ValueError):
    """A rule file failed to parse or validate. Rules already loaded stay in force."""

    def __init__(self, path: str, line: int | None, problem: str, column: int | None = None) -> None:
        self.path = path
        self.line = line
        self.column = column if line is not None else None  # 1-based, like line
        self.problem = problem
        where = path if line is None else f"{path}:{line}" if self.column is None else f"{path}:{line}:{self.column}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # picklable with its column (a reload runs in a thread; errors cross to the loop)
        return (type(self), (self.path, self.line, self.problem, self.column))


class BackendError(MilliwattError):
    """A model backend failed to produce an answer."""

    def __init__(self, message: str, *, backend: str = "", model: str = "") -> None:
        self.backend = backend
        self.model = model
        super().__init__(message)


class ModelLoadError(BackendError):
    """A local model could not be loaded (a missing, truncated or foreign file). Recorded as
    the tier's ``error`` attempt, never turned into a gate's pass: it is a fault to fix, and the
    backend does not try the load again until its retry interval has passed."""


class RemoteError(BackendError):
    """The remote tier failed after its retries. ``status_code``: the provider's HTTP status,
    when it sent one."""

    def __init__(self, message: str, *, backend: str = "", model: str = "", status_code: int | None = None) -> None:
        super().__init__(message, backend=backend, model=model)
        self.status_code = status_code


class RemoteTimeout(RemoteError):
    """The provider did not answer within the configured timeout."""


class RemoteRateLimited(RemoteError):
    """The provider refused for rate or quota reasons (HTTP 429)."""


class RemoteUnavailable(RemoteError):
    """The provider could not be reached or failed on its side (connection, 5xx)."""


class RemoteStreamError(RemoteUnavailable):
    """A streamed answer broke after it had begun (the connection dropped, a chunk was not
    valid): not retried, since chunks were already handed on. ``partial`` is the answer as far
    as it came (an OpenAI assistant message); the ledger records it, with its energy."""

    partial: dict | None = None


class RemoteBadRequest(RemoteError):
    """The provider rejected the request (4xx other than 429): retrying will not help."""


class RemoteAuthError(RemoteError):
    """The provider rejected the credentials (401/403)."""


class NoTierAnswered(MilliwattError):
    """Every tier passed; only possible when the cascade has no always-answering tier."""
