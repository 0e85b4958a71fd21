"""Tokens never reach logs, tracebacks or the doctor's output."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from bot.secrets_filter import SecretFilter, mask, redact

ROOT = Path(__file__).resolve().parents[1]
TG = "123456789:AAHfakeTokenForTests_abcdefghijklmnopq"


def test_redact_known_and_token_shaped_strings():
    text = f"POST https://api.telegram.org/bot{TG}/getMe failed; discord my-secret-value-123"
    out = redact(text, ["my-secret-value-123"])
    assert TG not in out and "my-secret-value-123" not in out and out.count("[token]") == 2


def test_filter_masks_messages_args_and_tracebacks(caplog):
    logger = logging.getLogger("test.secrets")
    handler = logging.StreamHandler()
    flt = SecretFilter([TG])
    try:
        raise RuntimeError(f"bad token {TG}")
    except RuntimeError:
        record = logger.makeRecord("x", logging.ERROR, __file__, 1, "url %s", (TG,),
                                   sys.exc_info())
    flt.filter(record)
    formatted = handler.format(record)
    assert TG not in formatted and "[token]" in formatted


def test_mask_shows_only_a_prefix():
    assert mask(TG) == f"1234…({len(TG)} chars)" and mask("") == "(not set)"


def test_uncaught_traceback_is_redacted(tmp_path):
    (tmp_path / "config.toml").write_text('[engine]\nbackend = "dry-run"\n'
                                          '[discord]\ntoken = "x"\n')
    script = ("import sys; sys.argv=['bot','doctor']\n"
              "from bot.secrets_filter import install_secret_filter\n"
              f"install_secret_filter([{TG!r}])\n"
              f"raise RuntimeError('connecting with ' + {TG!r})\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert "RuntimeError: connecting with [token]" in done.stderr
    assert TG not in done.stderr


def test_interaction_tokens_in_discord_urls_are_redacted():
    """An interaction token answers its user for 15 minutes and now waits in the journal until
    answered; discord.py logs the webhook and callback URLs that carry it at debug level."""
    token = "aW50ZXJhY3Rpb246MTIzNDU2Nzg5MDEyMzQ1Njc4OTpBQkNERUZHSElKS0xNTk9QUVJTVFVW"
    lines = [f"Webhook ID 900 with PATCH https://discord.com/api/v10/webhooks/900/{token}"
             "/messages/@original has returned status code 200",
             f"POST https://discord.com/api/v10/interactions/1234/{token}/callback returned 204"]
    for line in lines:
        out = redact(line, [])
        assert token not in out and "/[token]/" in out
