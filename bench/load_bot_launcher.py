"""Run ``python -m bot`` with discord.py pointed at a fake Discord: the load test's bot process.

    python -m bench.load_bot_launcher --discord-api http://127.0.0.1:PORT/api/v10 \\
        --discord-gateway ws://127.0.0.1:PORT/gateway run --config load.toml

discord.py has no setting for its REST base or its gateway; both are class attributes
(``discord.http.Route.BASE``, ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY``), so this sets
them and then hands over to ``bot.__main__.main`` unchanged: the process under test is the real
bot, signals and all. Telegram needs no patch: its fake's address is ``telegram.base_url``.
"""

from __future__ import annotations

import argparse
import sys


def patch_discord(api_base: str, gateway: str) -> None:
    import discord
    import yarl

    discord.http.Route.BASE = api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load_bot_launcher",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--discord-api", required=True, metavar="URL")
    parser.add_argument("--discord-gateway", required=True, metavar="URL")
    args, bot_argv = parser.parse_known_args(argv)
    patch_discord(args.discord_api, args.discord_gateway)
    from bot.__main__ import main as bot_main

    return bot_main(bot_argv)


if __name__ == "__main__":
    sys.exit(main())
