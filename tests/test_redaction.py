"""No credential is written: provider error texts that echo a key are redacted before they
reach a raised error, the ledger or the log. The end-to-end test drives the real remote
path (litellm, HTTP) against a loopback server whose error messages contain the key."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import traceback
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from milliwatt import Milliwatt, RemoteError
from milliwatt.adapters.litellm_backend import LiteLLMBackend
from milliwatt.ledger import Ledger
from milliwatt.model_tier import ModelTier
from milliwatt.redaction import REDACTED, RedactingFilter, redact, register_secret
from milliwatt.testing import ScriptedTier

KEY = "sk-live-abcdef1234567890abcdef"
GOOGLE_KEY = "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW"
USER = [{"role": "user", "content": "Where is my order?"}]


# --------------------------------------------------------------------------- redact()


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"Incorrect API key provided: {KEY}.", KEY),
        ("key sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123 rejected", "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123"),
        ("invalid x-api-key sk-ant-api03-AbCdEfGhIj_KlMnOp-QrSt", "sk-ant-api03-AbCdEfGhIj_KlMnOp-QrSt"),
        (f"GET https://generativelanguage.googleapis.com/v1/models?alt=json&key={GOOGLE_KEY}", GOOGLE_KEY),
        (f"bare google key {GOOGLE_KEY}", GOOGLE_KEY),
        ("AWS said: AKIAIOSFODNN7EXAMPLE is not authorised", "AKIAIOSFODNN7EXAMPLE"),
        ("sent Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig to the proxy", "eyJhbGciOiJIUzI1NiJ9.payload.sig"),
        ("headers={'Authorization': 'Basic dXNlcjpwYXNzd29yZA=='}", "dXNlcjpwYXNzd29yZA=="),
        ("Authorization: opaque-token-4567", "opaque-token-4567"),
        ("https://h/x?api_key=hunter2hunter2&page=2", "hunter2hunter2"),
        ("https://h/x?a=1&API-KEY=hunter2hunter2", "hunter2hunter2"),
        ("https://h/x?ApiKey=hunter2hunter2", "hunter2hunter2"),
        ("https://h/x?access_token=ya29.a0Af-xyz", "ya29.a0Af-xyz"),
        ("https://h/x?token=tok_123456789", "tok_123456789"),
        ("https://h/x?secret=s3cr3t-v4lue", "s3cr3t-v4lue"),
        ("postgres://h/db?password=pa55word!", "pa55word!"),
        ("https://blob/x?sv=2020&sig=AbC%2FdEf%3D", "AbC%2FdEf%3D"),
    ],
)
def test_redact_replaces_credentials(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out and REDACTED in out
    assert redact(out) == out  # idempotent: a redacted text redacted again is unchanged


def test_redact_keeps_ordinary_text() -> None:
    text = "max_tokens=12, the key point: 5 tokens; monkey=1; sk-test is too short to be a key"
    assert redact(text) == text
    assert redact("Bearer") == "Bearer" and redact("") == ""


def test_a_registered_secret_is_redacted_whatever_its_shape() -> None:
    odd = "mw-7f3c9e1d2b4a-odd-shaped"
    assert redact(f"provider echoed {odd} back") == f"provider echoed {odd} back"
    register_secret(odd)
    assert redact(f"provider echoed {odd} back") == f"provider echoed {REDACTED} back"
    register_secret("short")  # too short to be a key: registering it would garble words
    assert redact("a short text") == "a short text"


def test_the_log_filter_redacts_message_arguments_and_traceback() -> None:
    try:
        raise RuntimeError(f"boom with {KEY}")
    except RuntimeError:
        import sys

        record = logging.LogRecord("milliwatt", logging.ERROR, __file__, 1, "failed: %s (%s)", (KEY, 3), sys.exc_info())
    assert RedactingFilter().filter(record)
    assert KEY not in record.getMessage() and "failed: [REDACTED] (3)" == record.getMessage()
    assert record.exc_text and KEY not in record.exc_text and "RuntimeError" in record.exc_text


def test_the_milliwatt_loggers_carry_the_filter(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("milliwatt").warning("key in message %s", KEY)
    logging.getLogger("milliwatt.remote").warning("key in message %s", KEY)
    assert caplog.records and KEY not in caplog.text


# --------------------------------------------------------------------------- end to end


class _EchoingProvider(BaseHTTPRequestHandler):
    """An OpenAI-style endpoint that fails, echoing the key back in its error message."""

    statuses: ClassVar[list[int]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        status = self.statuses.pop(0) if self.statuses else 400
        message = (
            f"Incorrect API key provided: {KEY}. You can find your API key at "
            f"https://platform.example/account?key={GOOGLE_KEY}&sig=abc123def456"
        )
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": status}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def echoing_server() -> Iterator[tuple[str, type[_EchoingProvider]]]:
    handler = type("Handler", (_EchoingProvider,), {"statuses": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", handler
    finally:
        server.shutdown()
        server.server_close()


def _files_bytes(folder: Path) -> bytes:
    """Every byte under ``folder``: the SQLite file, its -wal and -shm, any spool."""
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("statuses", [[400], [500, 500]], ids=["400", "500-retried"])
async def test_a_key_echoed_by_the_provider_reaches_no_error_ledger_or_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, echoing_server: tuple[str, type[_EchoingProvider]], statuses: list[int]
) -> None:
    api_base, handler = echoing_server
    handler.statuses = list(statuses)
    caplog.set_level(logging.DEBUG)
    db = tmp_path / "ledger" / "mw.db"
    db.parent.mkdir()
    backend = LiteLLMBackend(
        "openai/gpt-4o", api_base=api_base, api_key=KEY, max_retries=len(statuses) - 1, backoff_base_s=0.001, backoff_cap_s=0.01
    )
    ledger = Ledger(f"sqlite:///{db}")
    mw = Milliwatt([ScriptedTier("rules", lambda step: None), ModelTier("remote", backend)], ledger=ledger)
    with pytest.raises(RemoteError) as err:
        await mw.step(USER)
    await mw.aclose()
    assert not handler.statuses  # every scripted answer was asked for: the 5xx was retried

    text = "".join(traceback.format_exception(err.value))
    assert "Incorrect API key provided: [REDACTED]" in text
    stored = _files_bytes(db.parent)
    reasons = [r for (r,) in sqlite3.connect(db).execute("SELECT reason FROM attempts WHERE outcome = 'error'")]
    assert len(reasons) == 1 and "Incorrect API key provided: [REDACTED]" in reasons[0]
    if len(statuses) > 1:
        assert "attempt 1 failed" in caplog.text and "[REDACTED]" in caplog.text
    for secret in (KEY, GOOGLE_KEY, "abc123def456"):
        assert secret not in text, "the raised error"
        assert secret.encode() not in stored, "the ledger files"
        assert secret not in caplog.text, "the log"
