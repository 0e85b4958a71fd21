"""``python -m bot worker``: one GPU worker of the bot's ``[cluster]``, until Ctrl-C or SIGTERM
(the job running then finishes first; a second signal is the process's default: it stops)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from engine.config import Config

log = logging.getLogger(__name__)


def serve_worker(config: Config) -> int:
    if not config.cluster.url:
        print("python -m bot worker needs [cluster] url in the config (the NATS server the bot "
              "uses)", file=sys.stderr)
        return 2
    try:
        import nats  # noqa: F401
    except ImportError:
        print("the cluster needs nats-py: pip install '.[cluster]'", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config))
    except KeyboardInterrupt:  # pragma: no cover - a second Ctrl-C
        pass
    except Exception as exc:  # a start-up failure: one clear line, the trace only with -v
        log.debug("worker failed", exc_info=True)
        print(f"worker stopped: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(config: Config) -> None:
    from engine.cluster.worker import ClusterWorker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def first_signal() -> None:
        log.info("stopping after the running job (a second signal stops at once)")
        stop.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, first_signal)
    async with ClusterWorker(config) as worker:
        await worker.serve(stop)
