"""Arguments of the admin commands, the same on every adapter."""

from __future__ import annotations

from engine.store import UNLIMITED

DEFAULT_WORDS = ("default", "none", "reset")
UNLIMITED_WORDS = ("unlimited", "off", "no-limit")
MAX_LIMIT_DIGITS = 7


def parse_limit_value(text: str) -> tuple[bool, int | None]:
    """``/limit``'s value: (ok, images) where images is a number, 0 (no images at all),
    ``UNLIMITED`` or None (back to the default)."""
    value = text.lower()
    if value in DEFAULT_WORDS:
        return True, None
    if value in UNLIMITED_WORDS:
        return True, UNLIMITED
    if value.isascii() and value.isdigit() and len(value) <= MAX_LIMIT_DIGITS:
        return True, int(value)
    return False, None
