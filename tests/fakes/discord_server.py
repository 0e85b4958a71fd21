"""A fake Discord (REST + gateway) on 127.0.0.1 that the real discord.py client talks to.

    server = FakeDiscord()
    await server.start()
    server.patch(monkeypatch)            # Route.BASE and DEFAULT_GATEWAY point here
    ...start the bot; it logs in, syncs commands and connects to the gateway...
    sent = await server.slash("imagine", ALICE, prompt="a red fox --seed 7")
    call = await server.wait_for(lambda c: c.name == "edit_original" and c.files)

Every HTTP call is recorded as a ``Call`` (route name, JSON body or ``payload_json``, uploaded
file bytes, the status answered, who the message would ping). Unknown routes answer 404 and are
recorded as ``unknown``, so a new call shows up in a test. ``fail_next`` injects one-shot
failures (a 429 with ``retry_after``, a 5xx, a late acknowledgement); a message whose files
together exceed the interaction's ``attachment_size_limit`` is refused with 413.
``answer_late`` takes a call but answers late (or never: the connection drops), as when an upload
reached Discord and its answer was lost. A channel post with a ``nonce`` and ``enforce_nonce``
seen before in that channel returns the message the first one made (Discord does so for a few
minutes; the fake for ever), and ``GET /channels/{id}/messages`` lists a channel, newest first.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yarl
from aiohttp import web

from tests.fakes import discord_payloads as payloads
from tests.fakes.discord_payloads import FakeAttachment, FakeUser, Upload, pings_of

__all__ = ["Call", "FakeAttachment", "FakeDiscord", "FakeUser", "SentInteraction", "Upload",
           "pings_of"]
API = "/api/v10"
DISCORD_EPOCH_MS = 1_420_070_400_000


@dataclass
class Call:
    """One HTTP request the client made, and what the fake answered."""

    name: str  # e.g. "interaction_callback", "edit_original", "followup", "channel_message"
    method: str
    path: str  # without the /api/v10 prefix
    query: dict[str, str]
    json: Any
    files: list[Upload]
    status: int = 200
    token: str | None = None  # the interaction token in the path, if any
    pings: frozenset[str] = frozenset()  # who this message would notify: "everyone", "user:1"
    at: float = field(default_factory=time.monotonic)

    @property
    def content(self) -> str | None:
        return self.json.get("content") if isinstance(self.json, dict) else None


@dataclass(frozen=True)
class SentInteraction:
    id: str
    token: str
    payload: dict[str, Any]
    at: float = field(default_factory=time.monotonic)  # when it went out (for ack latency)


class FakeDiscord:
    def __init__(self) -> None:
        self.bot = FakeUser("900000000000000001", "imagine-bot")
        self.app_id = self.bot.id
        self.guild_id = "800000000000000001"
        self.channel_id = "700000000000000001"
        self.attachment_size_limit = 10 * 1024 * 1024
        self.calls: list[Call] = []
        self.gateway_log: list[dict[str, Any]] = []  # every gateway frame the client sent
        self.commands: dict[str, list[dict[str, Any]]] = {}  # "global" or guild id -> commands
        self.messages: dict[str, dict[str, Any]] = {}
        self.originals: dict[str, str] = {}  # interaction token -> message id
        self.ready = asyncio.Event()
        self._down: dict[str, tuple[float, Callable[[Call], bool]]] = {}  # route -> outage
        self._failures: dict[str, list[tuple[Callable[[Call], bool], int, Any,
                                             dict[str, str]]]] = {}
        # interaction token -> (channel id, guild id or None, attachment size limit)
        self._where: dict[str, tuple[str, str | None, int]] = {}
        self._late: dict[str, list[tuple[Callable[[Call], bool], float, bool]]] = {}
        self.nonces: dict[tuple[str, str], str] = {}  # (channel id, nonce) -> message id
        self.user_files: dict[str, bytes] = {}  # attachment id -> what a download gets
        self._changed = asyncio.Condition()
        self._ws: web.WebSocketResponse | None = None
        self._seq = 0
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{aid}/{filename}", self._download)
        app.router.add_route("*", API + "/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}{API}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    def patch(self, monkeypatch: Any) -> None:
        import discord

        monkeypatch.setattr(discord.http.Route, "BASE", self.api_base)
        monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                            yarl.URL(self.gateway_url))

    # -- what tests call ---------------------------------------------------------------------
    def fail_next(self, name: str, status: int, body: Any = None, *, times: int = 1,
                  headers: dict[str, str] | None = None,
                  when: Callable[[Call], bool] = lambda call: True) -> None:
        """Answer the next ``times`` calls of route ``name`` matching ``when`` with ``status``."""
        if body is None:
            body = {"message": f"{status}: injected failure", "code": 0}
        self._failures.setdefault(name, []).extend([(when, status, body, headers or {})] * times)

    def outage(self, name: str, until: float,
               when: Callable[[Call], bool] = lambda call: True) -> None:
        """Calls of route ``name`` matching ``when`` get 503 until ``until`` (monotonic)."""
        self._down[name] = (until, when)

    def rate_limit_next(self, name: str, retry_after: float = 0.05,
                        when: Callable[[Call], bool] = lambda call: True) -> None:
        """A real-looking 429: a JSON ``retry_after`` and the ``Via`` header Discord sends."""
        body = {"message": "You are being rate limited.", "retry_after": retry_after,
                "global": False, "code": 0}
        self.fail_next(name, 429, body, when=when,
                       headers={"Via": "1.1 google", "X-RateLimit-Scope": "user"})

    def drop_next(self, name: str, *, times: int = 1,
                  when: Callable[[Call], bool] = lambda call: True) -> None:
        """Close the connection instead of answering (a network error; recorded as status 0)."""
        self.fail_next(name, 0, times=times, when=when)

    def answer_late(self, name: str, delay_s: float, *, drop: bool = False, times: int = 1,
                    when: Callable[[Call], bool] = lambda call: True) -> None:
        """Handle the next ``times`` calls of ``name`` matching ``when`` (a message is made),
        then answer after ``delay_s`` (``drop``: close the connection instead)."""
        self._late.setdefault(name, []).extend([(when, delay_s, drop)] * times)

    def channel_messages(self, channel_id: str | None = None) -> list[dict[str, Any]]:
        """The messages in a channel (default: the guild's), oldest first; no ephemeral ones."""
        channel = channel_id or self.channel_id
        return [m for m in self.messages.values()
                if m["channel_id"] == channel and not m["flags"] & 64]

    async def wait_for(self, predicate: Callable[[Call], bool], timeout: float = 5.0) -> Call:
        """The first recorded call matching ``predicate``, waiting for it if needed."""
        return (await self.wait_for_count(predicate, 1, timeout))[0]

    async def wait_for_count(self, predicate: Callable[[Call], bool], count: int,
                             timeout: float = 5.0) -> list[Call]:
        async def matched() -> list[Call]:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: len([c for c in self.calls if predicate(c)]) >= count)
                return [c for c in self.calls if predicate(c)]

        try:
            return await asyncio.wait_for(matched(), timeout)
        except TimeoutError:
            names = [(c.name, c.status) for c in self.calls]
            raise AssertionError(f"no {count} matching call(s) within {timeout} s; "
                                 f"calls so far: {names}") from None

    def calls_for(self, sent: SentInteraction) -> list[Call]:
        return [c for c in self.calls if c.token == sent.token]

    def original(self, sent: SentInteraction) -> dict[str, Any] | None:
        mid = self.originals.get(sent.token)
        return self.messages.get(mid) if mid else None

    async def slash(self, name: str, user: FakeUser, /, *, guild: bool = True,
                    channel_id: str | None = None, **options: Any) -> SentInteraction:
        """Send a slash command (in the guild, or a DM with ``guild=False``)."""
        data = payloads.command_data(self._snowflake(), name, options)
        return await self._interact(2, data, user, self.guild_id if guild else None,
                                    channel_id or self.channel_id)

    async def autocomplete(self, name: str, user: FakeUser, /, *, focused: str,
                           **options: Any) -> SentInteraction:
        """What Discord sends while a user types an option with autocomplete: interaction
        type 4 (APPLICATION_COMMAND_AUTOCOMPLETE) with the typed options so far, ``focused``
        the one being typed. The bot answers with callback type 8 and its choices."""
        data = payloads.command_data(self._snowflake(), name, options)
        for option in data["options"]:
            if option["name"] == focused:
                option["focused"] = True
        return await self._interact(4, data, user, self.guild_id, self.channel_id)

    def choices(self, sent: SentInteraction) -> list[dict[str, Any]]:
        """The choices the bot answered an ``autocomplete`` with (its type 8 callback)."""
        for call in self.calls_for(sent):
            if call.name == "interaction_callback" and call.json["type"] == 8:
                return call.json["data"]["choices"]
        raise AssertionError("the bot sent no autocomplete result for this interaction")

    def attachment(self, data: bytes, filename: str = "picture.png", *,
                   content_type: str = "image/png", size: int | None = None) -> FakeAttachment:
        """A file a user attaches: pass it as an option of ``slash`` (e.g. ``image=``)."""
        aid = self._snowflake()
        self.user_files[aid] = data
        url = f"http://127.0.0.1:{self.port}/attachments/{aid}/{filename}"
        return FakeAttachment(aid, filename, content_type, data, url,
                              len(data) if size is None else size)

    async def _download(self, request: web.Request) -> web.Response:
        """An attachment's URL (Discord's CDN): recorded as ``attachment_download``."""
        data = self.user_files.get(request.match_info["aid"])
        await self._record(Call(name="attachment_download", method="GET", path=request.path,
                                query={}, json=None, files=[],
                                status=404 if data is None else 200))
        return web.Response(status=404) if data is None else web.Response(body=data)

    async def click(self, message_id: str, custom_id: str, user: FakeUser) -> SentInteraction:
        """Press the button ``custom_id`` on a message the bot sent (it must carry that button)."""
        message = self.messages[message_id]
        ids = [c.get("custom_id") for row in message.get("components", [])
               for c in row.get("components", [])]
        if custom_id not in ids:
            raise AssertionError(f"message {message_id} has no button {custom_id!r}: {ids}")
        data = {"custom_id": custom_id, "component_type": 2}
        return await self._interact(3, data, user, message.get("guild_id"),
                                    message["channel_id"], message=message)

    async def _interact(self, kind: int, data: dict[str, Any], user: FakeUser,
                        guild_id: str | None, channel_id: str,
                        message: dict[str, Any] | None = None) -> SentInteraction:
        iid = self._snowflake()
        token = f"interaction-token-{iid}"
        payload = payloads.interaction(iid, token, self.app_id, kind, data, user,
                                       guild_id=guild_id, channel_id=channel_id,
                                       size_limit=self.attachment_size_limit)
        if message is not None:
            payload["message"] = message
        self._where[token] = (channel_id, guild_id, self.attachment_size_limit)
        sent = SentInteraction(iid, token, payload)
        await self.dispatch("INTERACTION_CREATE", payload)
        return sent

    # -- gateway -----------------------------------------------------------------------------
    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws
        self.gateway_log.append({"connect": dict(request.query)})
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 41250}})
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            if frame.get("op") == 2:
                frame = {"op": 2, "d": {**frame["d"], "token": "<redacted>"}}
            self.gateway_log.append(frame)
            if frame.get("op") == 1:
                await ws.send_json({"op": 11})
            elif frame.get("op") == 2:
                await self._identify(ws)
            elif frame.get("op") == 6:  # resume: say the session is gone, so it identifies again
                await ws.send_json({"op": 9, "d": False})
        if self._ws is ws:
            self._ws = None
        return ws

    async def _identify(self, ws: web.WebSocketResponse) -> None:
        await self.dispatch("READY", payloads.ready(self.bot, self.guild_id, self.gateway_url))
        await self.dispatch("GUILD_CREATE",
                            payloads.guild_create(self.guild_id, self.channel_id, self.bot))
        self.ready.set()

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        if self._ws is None:
            raise AssertionError("the client is not connected to the fake gateway")
        self._seq += 1
        await self._ws.send_json({"op": 0, "t": event, "s": self._seq, "d": data})

    # -- REST --------------------------------------------------------------------------------
    _ROUTES: list[tuple[str, re.Pattern[str], str]] = [
        (m, re.compile(p), n) for m, p, n in [
            ("GET", r"/users/@me", "get_me"),
            ("GET", r"/oauth2/applications/@me", "app_info"),
            ("PUT", r"/applications/(?P<app>\d+)/commands", "sync_global"),
            ("PUT", r"/applications/(?P<app>\d+)/guilds/(?P<guild>\d+)/commands", "sync_guild"),
            ("POST", r"/interactions/(?P<iid>\d+)/(?P<token>[^/]+)/callback",
             "interaction_callback"),
            ("GET", r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)/messages/@original", "get_original"),
            ("PATCH", r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)/messages/@original",
             "edit_original"),
            ("DELETE", r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)/messages/@original",
             "delete_original"),
            ("POST", r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)", "followup"),
            ("PATCH", r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)/messages/(?P<mid>\d+)",
             "edit_followup"),
            ("POST", r"/channels/(?P<channel>\d+)/messages", "channel_message"),
            ("GET", r"/channels/(?P<channel>\d+)/messages", "channel_history"),
        ]
    ]

    async def _rest(self, request: web.Request) -> web.Response:
        path = request.path[len(API):]
        name, params = "unknown", {}
        for method, pattern, route in self._ROUTES:
            match = pattern.fullmatch(path)
            if match and method == request.method:
                name, params = route, match.groupdict()
                break
        body, files = await payloads.read_body(request)
        call = Call(name=name, method=request.method, path=path, query=dict(request.query),
                    json=body, files=files, token=params.get("token"),
                    pings=pings_of(body) if isinstance(body, dict) else frozenset())
        status, answer, headers = self._answer(call, params)
        call.status = status
        await self._record(call)
        late = self._late_answer(call)
        if late is not None:
            await asyncio.sleep(late[0])
            status = 0 if late[1] else status
        if status == 0 and request.transport is not None:
            request.transport.close()  # the client sees the server disconnect
        return payloads.json_response(status or 500, answer, headers)

    async def _record(self, call: Call) -> None:
        async with self._changed:
            self.calls.append(call)
            self._changed.notify_all()

    def _late_answer(self, call: Call) -> tuple[float, bool] | None:
        queued = self._late.get(call.name, [])
        for index, (when, delay_s, drop) in enumerate(queued):
            if when(call):
                del queued[index]
                return delay_s, drop
        return None

    def _answer(self, call: Call, params: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        until, when = self._down.get(call.name, (0.0, None))
        if when is not None and time.monotonic() < until and when(call):
            return 503, {"message": "503: Service Unavailable", "code": 0}, {}
        queued = self._failures.get(call.name, [])
        for index, (when, status, body, headers) in enumerate(queued):
            if when(call):
                del queued[index]
                return status, body, headers
        limit = self._where.get(call.token or "", ("", None, self.attachment_size_limit))[2]
        if sum(len(f.data) for f in call.files) > limit:  # the whole message counts
            return 413, {"message": "Request entity too large", "code": 40005}, {}
        handler = getattr(self, f"_on_{call.name}", None)
        if handler is None:
            return 404, {"message": "404: Not Found", "code": 0}, {}
        result = handler(call, params)
        return (result if isinstance(result, tuple) else (200, result, {}))  # type: ignore

    def _on_get_me(self, call: Call, params: dict[str, str]) -> Any:
        return {**self.bot.payload(bot=True), "verified": True, "mfa_enabled": False,
                "flags": 0}

    def _on_app_info(self, call: Call, params: dict[str, str]) -> Any:
        return {"id": self.app_id, "name": "imagine", "description": "", "icon": None,
                "bot_public": True, "bot_require_code_grant": False, "verify_key": "00",
                "owner": FakeUser("1", "owner").payload(), "flags": 0}

    def _on_sync_global(self, call: Call, params: dict[str, str]) -> Any:
        return self._store_commands("global", call.json)

    def _on_sync_guild(self, call: Call, params: dict[str, str]) -> Any:
        return self._store_commands(params["guild"], call.json, guild_id=params["guild"])

    def _store_commands(self, key: str, commands: list[dict[str, Any]],
                        guild_id: str | None = None) -> list[dict[str, Any]]:
        stored = [{**c, "id": self._snowflake(), "application_id": self.app_id,
                   "version": "1", "type": c.get("type", 1), "guild_id": guild_id,
                   "default_member_permissions": c.get("default_member_permissions")}
                  for c in commands]
        self.commands[key] = stored
        return stored

    def _on_interaction_callback(self, call: Call, params: dict[str, str]) -> Any:
        kind = call.json["type"]
        data = call.json.get("data") or {}
        info: dict[str, Any] = {"id": params["iid"], "type": kind}
        answer: dict[str, Any] = {"interaction": info}
        if kind in (4, 5):  # a message (5: "is thinking…"), which becomes @original
            ephemeral = bool((data.get("flags") or 0) & 64)
            message = self._new_message(params["token"], data, call.files,
                                        flags=(64 if ephemeral else 0) | (128 if kind == 5 else 0))
            self.originals[params["token"]] = message["id"]
            info.update(response_message_id=message["id"], response_message_loading=kind == 5,
                        response_message_ephemeral=ephemeral)
            answer["resource"] = {"type": kind, "message": message}
        return answer

    def _on_edit_original(self, call: Call, params: dict[str, str]) -> Any:
        mid = self.originals.get(params["token"])
        if mid is None:
            return 404, {"message": "Unknown Message", "code": 10008}, {}
        return self._edit(self.messages[mid], call)

    def _on_get_original(self, call: Call, params: dict[str, str]) -> Any:
        mid = self.originals.get(params["token"])
        return self.messages[mid] if mid else (404, {"message": "Unknown Message",
                                                     "code": 10008}, {})

    def _on_delete_original(self, call: Call, params: dict[str, str]) -> Any:
        mid = self.originals.pop(params["token"], None)
        self.messages.pop(mid or "", None)
        return 204, None, {}

    def _on_followup(self, call: Call, params: dict[str, str]) -> Any:
        payload = call.json or {}
        return self._new_message(params["token"], payload, call.files,
                                 flags=payload.get("flags") or 0)

    def _on_edit_followup(self, call: Call, params: dict[str, str]) -> Any:
        message = self.messages.get(params["mid"])
        if message is None:
            return 404, {"message": "Unknown Message", "code": 10008}, {}
        return self._edit(message, call)

    def _on_channel_message(self, call: Call, params: dict[str, str]) -> Any:
        payload = call.json or {}
        key = (params["channel"], str(payload.get("nonce")))
        if payload.get("enforce_nonce") and key in self.nonces:
            return self.messages[self.nonces[key]]  # the first post's message, not a new one
        created = self._new_message(None, payload, call.files, channel_id=params["channel"])
        if payload.get("nonce") is not None:
            created["nonce"] = payload["nonce"]
            self.nonces[key] = created["id"]
        return created

    def _on_channel_history(self, call: Call, params: dict[str, str]) -> Any:
        limit = int(call.query.get("limit", 50))
        return list(reversed(self.channel_messages(params["channel"])))[:limit]

    # -- messages ----------------------------------------------------------------------------
    def _new_message(self, where: str | None, payload: dict[str, Any], files: list[Upload],
                     flags: int = 0, channel_id: str | None = None) -> dict[str, Any]:
        """A message in the interaction's channel (``where`` = its token) or in ``channel_id``."""
        channel, guild = channel_id, self.guild_id
        if where is not None:
            channel, guild, _ = self._where.get(where, (self.channel_id, self.guild_id, 0))
        created = payloads.message(self._snowflake(), channel or self.channel_id, guild,
                                   self.bot, flags)
        payloads.apply(created, payload, files, self._attachment)
        self.messages[created["id"]] = created
        return created

    def _edit(self, message: dict[str, Any], call: Call) -> dict[str, Any]:
        payloads.apply(message, call.json or {}, call.files, self._attachment)
        message["edited_timestamp"] = payloads.now_iso()
        message["flags"] = message["flags"] & ~128  # no longer "thinking"
        return message

    def _attachment(self, upload: Upload) -> dict[str, Any]:
        aid = self._snowflake()
        url = f"http://127.0.0.1:{self.port}/attachments/{aid}/{upload.filename}"
        return {"id": aid, "filename": upload.filename, "size": len(upload.data), "url": url,
                "proxy_url": url, "content_type": upload.content_type}

    def _snowflake(self) -> str:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return str((ms << 22) | (next(self._ids) % 4096))
