"""Discord API objects for the fake server: just the fields discord.py needs to parse them.

Also the HTTP helpers (reading JSON or multipart bodies, answering JSON the way discord.py
parses it) and ``pings_of``: who Discord would notify for a message under its allowed mentions.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

PERMISSIONS = "2248473465835073"  # what the fake grants everyone: plenty
MASS = re.compile(r"@(everyone|here)")
USER_MENTION = re.compile(r"<@!?(\d+)>")
ROLE_MENTION = re.compile(r"<@&(\d+)>")


@dataclass(frozen=True)
class FakeUser:
    id: str
    name: str
    locale: str = "en-US"  # the user's Discord client language, sent with each interaction

    def payload(self, bot: bool = False) -> dict[str, Any]:
        return {"id": self.id, "username": self.name, "global_name": self.name,
                "discriminator": "0", "avatar": None, "bot": bot, "public_flags": 0}

    def member(self, bot: bool = False) -> dict[str, Any]:
        return {"user": self.payload(bot), "roles": [], "joined_at": now_iso(), "deaf": False,
                "mute": False, "flags": 0, "permissions": PERMISSIONS}


@dataclass
class Upload:
    field: str  # "files[0]"
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class FakeAttachment:
    """A file given to a slash command's attachment option; the fake serves ``data`` at ``url``.
    ``size`` is what Discord announces (a test may claim more than ``data`` holds)."""

    id: str
    filename: str
    content_type: str
    data: bytes
    url: str
    size: int

    def payload(self) -> dict[str, Any]:
        return {"id": self.id, "filename": self.filename, "size": self.size, "url": self.url,
                "proxy_url": self.url, "content_type": self.content_type}


def ready(bot: FakeUser, guild_id: str, gateway_url: str) -> dict[str, Any]:
    return {"v": 10, "user": bot.payload(bot=True), "session_id": "fake-session",
            "resume_gateway_url": gateway_url, "guilds": [{"id": guild_id, "unavailable": True}],
            "application": {"id": bot.id, "flags": 0}, "private_channels": [],
            "relationships": []}


def text_channel(channel_id: str, guild_id: str) -> dict[str, Any]:
    return {"id": channel_id, "type": 0, "name": "general", "position": 0, "nsfw": False,
            "permission_overwrites": [], "guild_id": guild_id}


def guild_create(guild_id: str, channel_id: str, bot: FakeUser) -> dict[str, Any]:
    everyone = {"id": guild_id, "name": "@everyone", "permissions": PERMISSIONS, "position": 0,
                "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}
    return {"id": guild_id, "name": "Fake Guild", "owner_id": "1", "unavailable": False,
            "member_count": 2, "members": [bot.member(bot=True)],
            "channels": [text_channel(channel_id, guild_id)], "roles": [everyone], "emojis": [],
            "stickers": [], "features": [], "premium_tier": 0, "threads": [],
            "stage_instances": [], "guild_scheduled_events": [], "voice_states": [],
            "presences": [], "large": False, "joined_at": now_iso(), "icon": None,
            "splash": None, "afk_channel_id": None, "system_channel_id": None}


def interaction(iid: str, token: str, app_id: str, kind: int, data: dict[str, Any],
                user: FakeUser, *, guild_id: str | None, channel_id: str,
                size_limit: int) -> dict[str, Any]:
    """An INTERACTION_CREATE payload (2 = command, 3 = button) in a guild, or a DM if no guild."""
    payload: dict[str, Any] = {
        "id": iid, "application_id": app_id, "type": kind, "data": data, "token": token,
        "version": 1, "locale": user.locale, "entitlements": [], "app_permissions": PERMISSIONS,
        "context": 0 if guild_id else 1, "attachment_size_limit": size_limit,
        "authorizing_integration_owners": {"0": guild_id} if guild_id else {},
        "channel_id": channel_id,
    }
    if guild_id:
        payload.update(guild_id=guild_id, guild_locale="en-US", member=user.member(),
                       channel=text_channel(channel_id, guild_id))
    else:
        payload.update(user=user.payload(),
                       channel={"id": channel_id, "type": 1, "recipients": [user.payload()]})
    return payload


def command_data(command_id: str, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """A slash command's data; ``FakeUser`` and ``FakeAttachment`` values become user and
    attachment options with resolved data."""
    users: dict[str, Any] = {}
    members: dict[str, Any] = {}
    attachments: dict[str, Any] = {}
    given = []
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, FakeAttachment):
            attachments[value.id] = value.payload()
            given.append({"name": key, "type": 11, "value": value.id})
            continue
        if isinstance(value, FakeUser):
            users[value.id] = value.payload()
            members[value.id] = {k: v for k, v in value.member().items() if k != "user"}
        given.append({"name": key, "type": _option_type(value),
                      "value": value.id if isinstance(value, FakeUser) else value})
    data: dict[str, Any] = {"id": command_id, "name": name, "type": 1, "options": given}
    if users:
        data["resolved"] = {"users": users, "members": members}
    if attachments:
        data.setdefault("resolved", {})["attachments"] = attachments
    return data


def _option_type(value: Any) -> int:
    if isinstance(value, FakeUser):
        return 6
    if isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return 4
    return 10 if isinstance(value, float) else 3


def message(mid: str, channel_id: str, guild_id: str | None, author: FakeUser,
            flags: int = 0) -> dict[str, Any]:
    created = {"id": mid, "channel_id": channel_id, "author": author.payload(bot=True),
               "content": "", "timestamp": now_iso(), "edited_timestamp": None, "tts": False,
               "mention_everyone": False, "mentions": [], "mention_roles": [],
               "attachments": [], "embeds": [], "pinned": False, "type": 0, "components": [],
               "flags": flags}
    if guild_id:
        created["guild_id"] = guild_id
    return created


def apply(target: dict[str, Any], payload: dict[str, Any], files: list[Upload],
          attachment: Callable[[Upload], dict[str, Any]]) -> None:
    """Apply a create/edit payload: content, components, embeds and attachments.

    ``attachments`` lists what the message keeps: ``{"id": n}`` for the upload ``files[n]`` or
    the id of an attachment it already has; without that key, every upload is attached.
    """
    for key, empty in (("content", ""), ("components", []), ("embeds", [])):
        if key in payload:
            target[key] = payload[key] or empty
    uploads = {f.field: f for f in files}
    if "attachments" in payload:
        kept = {str(a["id"]): a for a in target["attachments"]}
        result = []
        for entry in payload["attachments"]:
            upload = uploads.get(f"files[{entry['id']}]")
            if upload is not None:
                result.append(attachment(upload))
            elif str(entry["id"]) in kept:
                result.append(kept[str(entry["id"])])
        target["attachments"] = result
    elif files:
        target["attachments"] = [attachment(f) for f in files]


def pings_of(payload: dict[str, Any]) -> frozenset[str]:
    """Who Discord would notify for this message: "everyone", "user:<id>", "role:<id>".

    Without ``allowed_mentions`` Discord parses every kind of mention in the content.
    """
    content = payload.get("content") or ""
    allowed = payload.get("allowed_mentions")
    parse = {"everyone", "users", "roles"} if allowed is None else set(allowed.get("parse", []))
    users = set() if allowed is None else {str(u) for u in allowed.get("users", [])}
    roles = set() if allowed is None else {str(r) for r in allowed.get("roles", [])}
    found = set()
    if "everyone" in parse and MASS.search(content):
        found.add("everyone")
    found |= {f"user:{u}" for u in USER_MENTION.findall(content) if "users" in parse or u in users}
    found |= {f"role:{r}" for r in ROLE_MENTION.findall(content) if "roles" in parse or r in roles}
    return frozenset(found)


async def read_body(request: web.Request) -> tuple[Any, list[Upload]]:
    """The JSON body (or a multipart ``payload_json``) and the uploaded files."""
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


def json_response(status: int, body: Any, headers: dict[str, str]) -> web.Response:
    if status == 204 or body is None:
        return web.Response(status=status, headers=headers)
    # discord.py parses JSON only when the Content-Type is exactly "application/json".
    return web.Response(status=status, body=json.dumps(body).encode(),
                        headers={"Content-Type": "application/json", **headers})


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000+00:00", time.gmtime())
