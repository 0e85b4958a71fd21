"""Command line: ``python -m bot run | imagine | doctor | worker`` (each takes ``--config``)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from pathlib import Path

from engine.config import ConfigError, load_config, url_secret
from engine.errors import EngineError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=None, metavar="FILE",
                        help="TOML config (default: config.toml here, else built-in defaults)")
    common.add_argument("--backend", choices=["flux", "dry-run"], default=None,
                        help="override engine.backend from the config")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", parents=[common], help="start the engine and every configured adapter")
    imagine = sub.add_parser("imagine", parents=[common], help="make one image, then exit")
    imagine.add_argument("prompt", help='the prompt (flags such as "--seed 7" may also go inside)')
    imagine.add_argument("--seed", type=int)
    imagine.add_argument("--steps", type=int)
    imagine.add_argument("--ar", dest="aspect", metavar="W:H")
    imagine.add_argument("--size", metavar="WxH")
    imagine.add_argument("--guidance", type=float)
    imagine.add_argument("-o", "--output", type=Path, help="where to write the PNG")
    sub.add_parser("worker", parents=[common],
                   help="run images for the bot as one GPU worker of its [cluster]")
    doctor = sub.add_parser("doctor", parents=[common],
                            help="check the set-up and say how to fix it")
    doctor.add_argument("--quick", action="store_true",
                        help="the health check of a running bot: files and its heartbeat only, "
                             "no GPU (a container's HEALTHCHECK)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from bot.secrets_filter import install_secret_filter, redact

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.backend:
        config.engine.backend = args.backend
    install_secret_filter([config.discord_token, config.telegram_token,
                           url_secret(config.cluster.url)])
    if args.command == "doctor":
        from bot.doctor import run_doctor

        try:
            code = run_doctor(config, args.config, quick=args.quick)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
            return code
        except BrokenPipeError:  # `doctor | head`: the reader has gone, which is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    if args.command == "worker":
        from bot.worker_main import serve_worker

        return serve_worker(config)
    from bot.app import run_bot

    try:
        if args.command == "imagine":
            return asyncio.run(_imagine(config, args))
        code = asyncio.run(run_bot(config))
        from engine.worker import GpuWorker

        if GpuWorker.abandoned:  # a GPU step hung: exiting must not wait for its thread
            logging.shutdown()
            os._exit(code or 1)
        return code
    except KeyboardInterrupt:  # pragma: no cover - a second Ctrl-C
        pass
    except Exception as exc:  # a start-up failure: one clear line, the trace only with -v
        logging.getLogger("bot").debug("start-up failed", exc_info=True)
        reason = redact(str(exc), [config.discord_token, config.telegram_token])
        print(f"could not start: {reason}\n(run `python -m bot doctor` for a check of the set-up; "
              "-v shows the trace)", file=sys.stderr)
        return 1
    return 0


async def _imagine(config, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from bot import render
    from engine.engine import Engine
    from engine.grammar import parse_command
    from engine.job import Progress
    from engine.request import Origin, User

    try:
        parsed = parse_command(args.prompt, config.limits)
        parsed, overridden = parsed.merged_with(config.limits, seed=args.seed, steps=args.steps,
                                                aspect=args.aspect, size=args.size,
                                                guidance=args.guidance)
        request = parsed.to_request(config.limits)
        if overridden:  # the same rule as Discord's options: the prompt's --flags win, said so
            print(render.conflicts_note(overridden), file=sys.stderr)
    except EngineError as exc:
        print(render.error(exc), file=sys.stderr)
        return 2
    # the bot may be running beside this: its queued and running jobs are its own
    async with Engine(config, recover=False) as engine:
        try:
            job = await engine.submit(User("cli", getpass.getuser()), request, Origin("cli"))
        except EngineError as exc:
            print(render.error(exc), file=sys.stderr)
            return 1
        async for event in job.events():
            if isinstance(event, Progress):
                print(render.progress(event.step, event.total, event.eta_s), file=sys.stderr)
        try:
            result = await job.result()
        except EngineError as exc:
            print(render.error(exc), file=sys.stderr)
            return 1
        # without -o the saved file is the delivery: kept even without engine.save_outputs
        await engine.mark_delivered(job, f"cli:{args.output or result.path}",
                                    keep_file=args.output is None)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_bytes(result.png)
    print(f"{args.output or result.path}\n{render.caption(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
