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
failures (a 429 with ``retry_after``, a 5xx, a late acknowledgement); uploads above the
interaction's ``attachment_size_limit`` are refused with 413 like the real API does.
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

API = "/api/v10"
DISCORD_EPOCH_MS = 1_420_070_400_000
MASS = re.compile(r"@(everyone|here)")
USER_MENTION = re.compile(r"<@!?(\d+)>")
ROLE_MENTION = re.compile(r"<@&(\d+)>")


@dataclass(frozen=True)
class FakeUser:
    id: str
    name: str

    def payload(self, bot: bool = False) -> dict[str, Any]:
        return {"id": self.id, "username": self.name, "global_name": self.name,
                "discriminator": "0", "avatar": None, "bot": bot, "public_flags": 0}


@dataclass
class Upload:
    field: str
    filename: str
    content_type: str
    data: bytes


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
        self._failures: dict[str, list[tuple[Callable[[Call], bool], int, Any,
                                             dict[str, str]]]] = {}
        self._limits: dict[str, int] = {}  # interaction token -> attachment size limit
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
                    channel_id: str | None = None, guild_id: str | None = None,
                    **options: Any) -> SentInteraction:
        """Send an application-command interaction; ``FakeUser`` values become user options."""
        resolved: dict[str, Any] = {"users": {}, "members": {}}
        opts = []
        for key, value in options.items():
            if value is None:
                continue
            opts.append({"name": key, "type": _option_type(value),
                         "value": value.id if isinstance(value, FakeUser) else value})
            if isinstance(value, FakeUser):
                resolved["users"][value.id] = value.payload()
                resolved["members"][value.id] = {"roles": [], "joined_at": _now_iso(),
                                                 "deaf": False, "mute": False, "flags": 0}
        data = {"id": self._snowflake(), "name": name, "type": 1, "options": opts}
        if resolved["users"]:
            data["resolved"] = resolved
        return await self._interact(2, data, user, guild, channel_id, guild_id)

    async def click(self, message_id: str, custom_id: str, user: FakeUser) -> SentInteraction:
        """Press the button ``custom_id`` on a message the bot sent (it must carry that button)."""
        message = self.messages[message_id]
        ids = [c.get("custom_id") for row in message.get("components", [])
               for c in row.get("components", [])]
        if custom_id not in ids:
            raise AssertionError(f"message {message_id} has no button {custom_id!r}: {ids}")
        data = {"custom_id": custom_id, "component_type": 2}
        guild = "guild_id" in message
        return await self._interact(3, data, user, guild, message["channel_id"],
                                    message.get("guild_id"), message=message)

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
        await self.dispatch("READY", {
            "v": 10, "user": self.bot.payload(bot=True), "session_id": "fake-session",
            "resume_gateway_url": self.gateway_url, "guilds": [{"id": self.guild_id,
                                                                "unavailable": True}],
            "application": {"id": self.app_id, "flags": 0}, "private_channels": [],
            "relationships": []})
        await self.dispatch("GUILD_CREATE", self._guild_payload())
        self.ready.set()

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        if self._ws is None:
            raise AssertionError("the client is not connected to the fake gateway")
        self._seq += 1
        await self._ws.send_json({"op": 0, "t": event, "s": self._seq, "d": data})

    def _guild_payload(self) -> dict[str, Any]:
        member = {"user": self.bot.payload(bot=True), "roles": [], "joined_at": _now_iso(),
                  "deaf": False, "mute": False, "flags": 0}
        channel = {"id": self.channel_id, "type": 0, "name": "general", "position": 0,
                   "permission_overwrites": [], "guild_id": self.guild_id, "nsfw": False}
        everyone = {"id": self.guild_id, "name": "@everyone", "permissions": "2248473465835073",
                    "position": 0, "color": 0, "hoist": False, "managed": False,
                    "mentionable": False, "flags": 0}
        return {"id": self.guild_id, "name": "Fake Guild", "owner_id": "1", "unavailable": False,
                "member_count": 2, "members": [member], "channels": [channel], "roles": [everyone],
                "emojis": [], "stickers": [], "features": [], "premium_tier": 0, "threads": [],
                "stage_instances": [], "guild_scheduled_events": [], "voice_states": [],
                "presences": [], "large": False, "joined_at": _now_iso(), "icon": None,
                "splash": None, "afk_channel_id": None, "system_channel_id": None}

    async def _interact(self, kind: int, data: dict[str, Any], user: FakeUser, guild: bool,
                        channel_id: str | None, guild_id: str | None,
                        message: dict[str, Any] | None = None) -> SentInteraction:
        iid = self._snowflake()
        token = f"interaction-token-{iid}"
        payload: dict[str, Any] = {
            "id": iid, "application_id": self.app_id, "type": kind, "data": data,
            "token": token, "version": 1, "locale": "en-US", "entitlements": [],
            "app_permissions": "2248473465835073", "context": 0 if guild else 1,
            "attachment_size_limit": self.attachment_size_limit,
            "authorizing_integration_owners": {"0": guild_id or self.guild_id} if guild else {},
        }
        channel_id = channel_id or self.channel_id
        if guild:
            guild_id = guild_id or self.guild_id
            payload.update(guild_id=guild_id, guild_locale="en-US", channel_id=channel_id,
                           channel={"id": channel_id, "type": 0, "guild_id": guild_id,
                                    "name": "general", "position": 0,
                                    "permission_overwrites": [], "nsfw": False},
                           member={"user": user.payload(), "roles": [], "joined_at": _now_iso(),
                                   "deaf": False, "mute": False, "flags": 0,
                                   "permissions": "2248473465835073"})
        else:
            payload.update(channel_id=channel_id, user=user.payload(),
                           channel={"id": channel_id, "type": 1,
                                    "recipients": [user.payload()]})
        if message is not None:
            payload["message"] = message
        self._limits[token] = self.attachment_size_limit
        sent = SentInteraction(iid, token, payload)
        await self.dispatch("INTERACTION_CREATE", payload)
        return sent

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
        body, files = await _read_body(request)
        call = Call(name=name, method=request.method, path=path, query=dict(request.query),
                    json=body, files=files, token=params.get("token"),
                    pings=pings_of(body) if isinstance(body, dict) else frozenset())
        status, answer, headers = self._answer(call, params)
        call.status = status
        await self._record(call)
        if status == 0 and request.transport is not None:
            request.transport.close()  # the client sees the server disconnect
        return _json_response(status or 500, answer, headers)

    async def _record(self, call: Call) -> None:
        async with self._changed:
            self.calls.append(call)
            self._changed.notify_all()

    def _answer(self, call: Call, params: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        queued = self._failures.get(call.name, [])
        for index, (when, status, body, headers) in enumerate(queued):
            if when(call):
                del queued[index]
                return status, body, headers
        limit = self._limits.get(call.token or "", self.attachment_size_limit)
        if any(len(f.data) > limit for f in call.files):
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
            message = self._new_message(self.channel_id, data, call.files,
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
        return self._new_message(self.channel_id, payload, call.files,
                                 flags=payload.get("flags") or 0)

    def _on_edit_followup(self, call: Call, params: dict[str, str]) -> Any:
        message = self.messages.get(params["mid"])
        if message is None:
            return 404, {"message": "Unknown Message", "code": 10008}, {}
        return self._edit(message, call)

    def _on_channel_message(self, call: Call, params: dict[str, str]) -> Any:
        return self._new_message(params["channel"], call.json or {}, call.files)

    # -- messages ----------------------------------------------------------------------------
    def _new_message(self, channel_id: str, payload: dict[str, Any], files: list[Upload],
                     flags: int = 0) -> dict[str, Any]:
        message = {
            "id": self._snowflake(), "channel_id": channel_id, "guild_id": self.guild_id,
            "author": self.bot.payload(bot=True), "content": "", "timestamp": _now_iso(),
            "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": [],
            "mention_roles": [], "attachments": [], "embeds": [], "pinned": False, "type": 0,
            "components": [], "flags": flags,
        }
        self._apply(message, payload, files)
        self.messages[message["id"]] = message
        return message

    def _edit(self, message: dict[str, Any], call: Call) -> dict[str, Any]:
        self._apply(message, call.json or {}, call.files)
        message["edited_timestamp"] = _now_iso()
        message["flags"] = message["flags"] & ~128  # no longer "thinking"
        return message

    def _apply(self, message: dict[str, Any], payload: dict[str, Any],
               files: list[Upload]) -> None:
        for key in ("content", "components", "embeds"):
            if key in payload:
                message[key] = payload[key] or ([] if key != "content" else "")
        uploads = {f.field: f for f in files}
        if "attachments" in payload:
            kept = {str(a["id"]): a for a in message["attachments"]}
            message["attachments"] = [
                self._attachment(uploads[f"files[{a['id']}]"])
                if f"files[{a['id']}]" in uploads else kept[str(a["id"])]
                for a in payload["attachments"] if f"files[{a['id']}]" in uploads
                or str(a["id"]) in kept]
        elif files:
            message["attachments"] = [self._attachment(f) for f in files]

    def _attachment(self, upload: Upload) -> dict[str, Any]:
        aid = self._snowflake()
        url = f"http://127.0.0.1:{self.port}/attachments/{aid}/{upload.filename}"
        return {"id": aid, "filename": upload.filename, "size": len(upload.data), "url": url,
                "proxy_url": url, "content_type": upload.content_type}

    def _snowflake(self) -> str:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return str((ms << 22) | (next(self._ids) % 4096))


def _option_type(value: Any) -> int:
    if isinstance(value, FakeUser):
        return 6
    if isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return 4
    if isinstance(value, float):
        return 10
    return 3


def pings_of(payload: dict[str, Any]) -> frozenset[str]:
    """Who Discord would notify for this message content under its ``allowed_mentions``."""
    content = payload.get("content") or ""
    allowed = payload.get("allowed_mentions")
    parse = {"everyone", "users", "roles"} if allowed is None else set(allowed.get("parse", []))
    users = set() if allowed is None else {str(u) for u in allowed.get("users", [])}
    roles = set() if allowed is None else {str(r) for r in allowed.get("roles", [])}
    found = set()
    if "everyone" in parse and MASS.search(content):
        found.add("everyone")
    for uid in USER_MENTION.findall(content):
        if "users" in parse or uid in users:
            found.add(f"user:{uid}")
    for rid in ROLE_MENTION.findall(content):
        if "roles" in parse or rid in roles:
            found.add(f"role:{rid}")
    return frozenset(found)


async def _read_body(request: web.Request) -> tuple[Any, list[Upload]]:
    ctype = request.headers.get("Content-Type", "")
    if ctype.startswith("multipart/"):
        body: Any = None
        files = []
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            data = await part.read()  # type: ignore[union-attr]
            if part.name == "payload_json":  # type: ignore[union-attr]
                body = json.loads(data)
            else:
                files.append(Upload(part.name or "", part.filename or "",  # type: ignore
                                    part.headers.get("Content-Type", ""), bytes(data)))
        return body, files
    raw = await request.read()
    if raw and ctype == "application/json":
        return json.loads(raw), []
    return None, []


def _json_response(status: int, body: Any, headers: dict[str, str]) -> web.Response:
    if status == 204 or body is None:
        return web.Response(status=status, headers=headers)
    # discord.py parses JSON only when the Content-Type is exactly "application/json".
    return web.Response(status=status, body=json.dumps(body).encode(),
                        headers={"Content-Type": "application/json", **headers})


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000+00:00", time.gmtime())
