"""Credentials out of everything milliwatt writes: error texts, ledger rows, log records.

Providers echo keys back (an ``Incorrect API key provided: sk-...`` message, a request URL
with ``?key=...`` in a 4xx text), and those texts would otherwise reach the ledger's
``attempts.reason`` and the log verbatim. ``redact`` replaces, with ``[REDACTED]``:

* keys by shape: OpenAI-style ``sk-...`` (``sk-proj-``, ``sk-ant-``, ``sk-live-`` ...),
  Google ``AIza...``, AWS access key ids (``AKIA...``, ``ASIA...``);
* ``Bearer <token>`` and the value of ``Authorization:`` / ``x-api-key:`` / ``api-key:`` headers;
* the value of parameters named key, api_key, api-key, apikey, access_token, token, secret,
  password or sig (any case), in a query string or written ``name=value``;
* every value registered with ``register_secret`` (the remote backend registers the key it
  sends), so a key with no recognisable shape is redacted too.

``RedactingFilter`` applies it to log records (message, arguments and the formatted
traceback). A filter set on a logger sees only the records created on that very logger,
not those of its children, so every milliwatt module takes its logger from ``get_logger``,
which installs the filter on it.
"""

from __future__ import annotations

import logging
import re
import threading

REDACTED = "[REDACTED]"
# Shorter values are not keys, and redacting them would garble ordinary words.
MIN_SECRET_LENGTH = 8

_PARAM_NAMES = r"key|api[_-]?key|access[_-]?token|token|secret|password|sig"
_NOT_DONE = r"(?!\[REDACTED\])"  # redacting twice changes nothing

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Header forms first, so "Authorization: Bearer x" keeps its name and loses the value.
    (
        re.compile(
            r"""(?i)(\b(?:proxy-)?authorization["']?\s*[:=]\s*["']?)(?:(?:bearer|basic|token)\s+)?"""
            + _NOT_DONE
            + r"""[^\s"',;}]+"""
        ),
        rf"\1{REDACTED}",
    ),
    (
        re.compile(r"""(?i)(\b(?:x-api-key|x-goog-api-key|api-key)["']?\s*:\s*["']?)""" + _NOT_DONE + r"""[^\s"',;}]+"""),
        rf"\1{REDACTED}",
    ),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+"), rf"\1{REDACTED}"),
    # name=value, in a query string or on its own (not inside a longer name: "max_token=" stays).
    (
        re.compile(r"(?i)(?<![A-Za-z0-9_-])((?:" + _PARAM_NAMES + r")=)" + _NOT_DONE + r"""[^&\s#"'<>,;)\]}]+"""),
        rf"\1{REDACTED}",
    ),
    # Keys by shape.
    (re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{8,}"), REDACTED),
    (re.compile(r"(?<![A-Za-z0-9])AIza[0-9A-Za-z_-]{20,}"), REDACTED),
    (re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[A-Z0-9]{16}(?![A-Z0-9])"), REDACTED),
)

_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()
_secrets_re: re.Pattern[str] | None = None


def register_secret(value: str | None) -> None:
    """Redact ``value`` wherever it appears from now on (in this process)."""
    global _secrets, _secrets_re
    if not value or len(value) < MIN_SECRET_LENGTH:
        return
    with _lock:
        if value in _secrets:
            return
        _secrets = _secrets | {value}
        # Longest first, so a key that contains another is replaced whole.
        alternatives = sorted(_secrets, key=len, reverse=True)
        _secrets_re = re.compile("|".join(re.escape(s) for s in alternatives))


def redact(text: str) -> str:
    """``text`` with every credential it contains replaced by ``[REDACTED]``."""
    if not text:
        return text
    known = _secrets_re
    if known is not None:
        text = known.sub(REDACTED, text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Redacts a record in place (its message with its arguments, and its traceback); never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: leave it to logging's own error handling
            return True
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FILTER = RedactingFilter()


def get_logger(name: str = "milliwatt") -> logging.Logger:
    """The named milliwatt logger, with the redacting filter on it (idempotent)."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
