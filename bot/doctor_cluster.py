"""``doctor`` with ``[cluster] url``: is the NATS server there, with JetStream, and which GPU
workers are online (their heartbeats), each as ``/status`` lists them."""

from __future__ import annotations

import asyncio
import ssl

from bot import render
from bot.doctor import Check
from engine.config import Config

CONNECT_TIMEOUT_S = 3.0  # a doctor answers in seconds, whatever the server does


def check_cluster(config: Config, timeout_s: float = CONNECT_TIMEOUT_S) -> list[Check]:
    from engine.cluster.names import CredentialsError, explain, refused
    from engine.config import public_url

    url = public_url(config.cluster.url)
    try:
        import nats  # noqa: F401
    except ImportError:
        return [Check("cluster", False, f"url {url} is set but nats-py is not installed",
                      "pip install '.[cluster]'")]
    try:
        return asyncio.run(asyncio.wait_for(_look(config, timeout_s), timeout_s * 3))
    except ssl.SSLCertVerificationError as exc:  # it answers, but cannot be trusted
        return [Check("cluster", False, f"NATS server {url}: {explain(exc)}",
                      "set [cluster] tls_ca to the CA file that signed the server's "
                      "certificate (and check the url's host is the one the certificate names)")]
    except CredentialsError as exc:  # the .creds file itself: no server asked
        return [Check("cluster", False, str(exc),
                      "point [cluster] credentials at the user's .creds file (nsc generate "
                      "creds), readable by this user")]
    except Exception as exc:  # refused, timed out, no TLS: say which
        if refused(exc):  # it answers, but will not have this client
            return [Check("cluster", False, f"NATS server {url}: {explain(exc)}",
                          "NATS does not tell a client why: an account the server does not "
                          "know, another operator's user, an expired JWT or a bad password; "
                          "`nsc generate creds` writes a new .creds file")]
        reason = explain(exc)
        return [Check("cluster", False, f"NATS server {url} not reachable: {reason}",
                      "start it (nats-server -js -sd /var/lib/nats -p 4222), or fix [cluster] "
                      "url, credentials and tls_ca")]


async def _look(config: Config, timeout_s: float) -> list[Check]:
    from engine.cluster.names import Names, connect, read_workers
    from engine.config import public_url

    settings = config.cluster
    url = public_url(settings.url)
    nc = await connect(settings, "imagine-bot doctor", once_within_s=timeout_s)
    try:
        js = nc.jetstream(timeout=timeout_s)
        try:
            await js.account_info()
        except Exception as exc:
            return [Check("cluster", False, f"NATS server {url} has no JetStream "
                          f"({exc})", "start nats-server with -js (and -sd for its files)")]
        checks = [Check("cluster", True, f"NATS server {url} reachable, JetStream on")]
        try:
            kv = await js.key_value(Names(settings.name).workers_bucket)
            workers = sorted((await read_workers(kv)).values(), key=lambda w: w.name)
        except Exception:  # no bucket yet: nobody has started there
            workers = []
    finally:
        await nc.close()
    if not workers:
        return [*checks, Check("workers", False, "no GPU worker online: every job is refused",
                               "start one per GPU: python -m bot worker --config FILE")]
    checks.append(Check("workers", True, f"{len(workers)} online"))
    checks += [Check("worker", True, line.removeprefix("• "))
               for line in render.workers_list(workers)]
    return checks
