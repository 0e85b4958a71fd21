"""Keep bot tokens out of every log line and traceback, whatever library writes them."""

from __future__ import annotations

import logging
import re
import sys
import traceback
from types import TracebackType

# Telegram tokens look like 123456:ABC..., Discord tokens like three dot-separated base64 parts.
# A Discord interaction token (a secret for 15 minutes; the journal keeps it until answered) is
# the path segment after an interaction's or webhook's id: discord.py logs those URLs at debug.
_TOKEN_SHAPES = [
    (re.compile(r"(?<!\d)\d{6,12}:[A-Za-z0-9_-]{30,}"), "[token]"),  # also ".../bot<token>/"
    (re.compile(r"\b[A-Za-z0-9_-]{20,30}\.[A-Za-z0-9_-]{5,8}\.[A-Za-z0-9_-]{25,}\b"), "[token]"),
    (re.compile(r"(/(?:webhooks|interactions)/\d+/)[A-Za-z0-9_.~%-]{20,}"), r"\1[token]"),
]


def mask(token: str) -> str:
    """Show only enough of a token to recognise it: '1234…(46 chars)'."""
    if not token:
        return "(not set)"
    return f"{token[:4]}…({len(token)} chars)"


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 8:
            text = text.replace(secret, "[token]")
    for shape, replacement in _TOKEN_SHAPES:
        text = shape.sub(replacement, text)
    return text


class SecretFilter(logging.Filter):
    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg = redact(message, self.secrets)
        record.args = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        return True


def install_secret_filter(secrets: list[str]) -> SecretFilter:
    """Attach to every handler of the root logger (filters on handlers see all records), and
    redact tracebacks that reach the top level without going through logging."""
    flt = SecretFilter(secrets)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    for handler in root.handlers:
        handler.addFilter(flt)

    def excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        text = "".join(traceback.format_exception(kind, exc, tb))
        sys.stderr.write(redact(text, flt.secrets))

    sys.excepthook = excepthook
    return flt
