"""A fake Telegram Bot API server on 127.0.0.1 for the real python-telegram-bot client.

    async with FakeTelegramServer() as tg:
        app = Application.builder().token(TOKEN).base_url(tg.base_url).build()
        tg.message("/imagine a red fox", chat_id=5, user_id=5)    # served by getUpdates
        call = await tg.wait_for("sendPhoto")                      # recorded, with file bytes

PTB posts form-encoded or multipart bodies to ``/bot<token>/<method>``; every value arrives as a
string (JSON-encoded when not a string), so ``Call.params`` holds strings and ``Call.json(name)``
decodes one. Every call is recorded (unknown methods too, answered 404 like the real API) with its
HTTP status, so a test sees exactly what the client sent. ``fail_next`` injects one-shot failures.
Like the real Bot API, a ``getUpdates`` with ``offset`` N confirms (forgets) the updates below N,
so a restarted bot gets only what its predecessor had not confirmed. ``served`` records when each
update was handed out (the load test measures acknowledgement latency from it). ``photo`` sends
a user's picture (a photo in two sizes, or an image document); ``getFile`` and the file URL serve
it (downloads are recorded as ``file`` calls).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

BOT_ID = 999_000
BOT_USERNAME = "ImagineTestBot"
BOT_USER = {"id": BOT_ID, "is_bot": True, "first_name": "Imagine", "username": BOT_USERNAME,
            "can_join_groups": True, "can_read_all_group_messages": False,
            "supports_inline_queries": False}
# Methods that only answer True.
_TRUE_METHODS = {"setMyCommands", "deleteMyCommands", "deleteWebhook", "sendChatAction",
                 "answerCallbackQuery", "deleteMessage", "close", "logOut"}


@dataclass(frozen=True)
class Upload:
    filename: str
    content_type: str
    data: bytes


@dataclass
class Call:
    """One request the client made, as the server saw it."""

    method: str
    token: str
    params: dict[str, str]
    files: dict[str, Upload]
    status: int = 200
    result: Any = None  # what the server answered (e.g. the sent Message as a dict)
    at: float = field(default_factory=time.monotonic)

    def json(self, name: str, default: Any = None) -> Any:
        """A parameter decoded from its JSON text (strings that are not JSON come back as is)."""
        if name not in self.params:
            return default
        try:
            return json.loads(self.params[name])
        except ValueError:
            return self.params[name]

    def upload(self, name: str) -> Upload:
        """The uploaded file for parameter ``name`` (directly, or via ``attach://``)."""
        if name in self.files:
            return self.files[name]
        ref = self.params.get(name, "")
        if ref.startswith("attach://"):
            return self.files[ref.removeprefix("attach://")]
        raise KeyError(f"{self.method} uploaded no file for {name!r}: {list(self.files)}")

    def media(self) -> list[tuple[dict[str, Any], Upload]]:
        """``sendMediaGroup``: each item of ``media`` with the file its ``attach://`` names."""
        return [(item, self.files[item["media"].removeprefix("attach://")])
                for item in self.json("media", [])]


@dataclass
class _Failure:
    status: int
    description: str
    retry_after: int | None


class FakeTelegramServer:
    """Records calls, serves queued updates, answers like the Bot API."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._updates: list[dict[str, Any]] = []  # not yet confirmed by a getUpdates offset
        self.served: dict[int, list[float]] = {}  # update id -> when getUpdates handed it out
        self.update_of: dict[tuple[int, int], int] = {}  # (chat id, message id) -> update id
        self.polls: list[float] = []  # when each getUpdates arrived
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(100)
        self._query_ids = itertools.count(1)
        self._chats: dict[int, dict[str, Any]] = {}
        self._messages: dict[tuple[int, int], dict[str, Any]] = {}
        self._failures: dict[str, list[_Failure]] = {}
        self._slow: dict[str, list[float]] = {}
        self._down: dict[str, float] = {}  # method -> monotonic time its outage ends
        # called with the update ids a getUpdates offset confirms, as it confirms them
        self.on_confirm: Callable[[list[int]], None] | None = None
        self.sent_updates: dict[int, dict[str, Any]] = {}
        self.user_files: dict[str, bytes] = {}  # file id -> what users sent (photo, document)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> FakeTelegramServer:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        app.router.add_route("*", "/file/bot{token}/{path:.*}", self._file)
        # No access log: its lines hold the token, as the real server's would; the bot's own
        # logs are what the tests inspect.
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing = True  # end pending long polls now, not after their timeout
        await self._notify()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    # -- what tests feed in ----------------------------------------------------------------
    def message(self, text: str, *, chat_id: int, user_id: int, chat_type: str | None = None,
                first_name: str = "Ada", username: str | None = None,
                reply_to: dict[str, Any] | None = None,
                language_code: str | None = None) -> dict[str, Any]:
        """Queue a user's text message (a command gets its ``bot_command`` entity), optionally
        a reply to ``reply_to`` (a message dict)."""
        chat = self._chat(chat_id, chat_type)
        message: dict[str, Any] = {
            "message_id": next(self._message_ids), "date": int(time.time()), "chat": chat,
            "from": {"id": user_id, "is_bot": False, "first_name": first_name,
                     "username": username or f"user{user_id}"},
            "text": text,
        }
        if language_code:  # the user's Telegram app language
            message["from"]["language_code"] = language_code
        if text.startswith("/"):
            command = text.split(maxsplit=1)[0]
            message["entities"] = [{"type": "bot_command", "offset": 0,
                                    "length": _utf16_len(command)}]
        if reply_to is not None:
            message["reply_to_message"] = reply_to
        self._messages[(chat_id, message["message_id"])] = message
        self._push({"message": message})
        self.update_of[(chat_id, message["message_id"])] = self._updates[-1]["update_id"]
        return message

    def photo(self, data: bytes, *, chat_id: int, user_id: int, caption: str | None = None,
              document: str | None = None, file_size: int | None = None,
              chat_type: str | None = None) -> dict[str, Any]:
        """Queue a user's picture: a photo (a 90-pixel thumbnail, then ``data``), or with
        ``document`` (a MIME type) an image file. ``file_size``: what Telegram announces."""
        message_id = next(self._message_ids)
        size = len(data) if file_size is None else file_size
        self.user_files[f"photo-{message_id}"] = data
        self.user_files[f"thumb-{message_id}"] = b"a thumbnail the bot should not take"
        message: dict[str, Any] = {
            "message_id": message_id, "date": int(time.time()),
            "chat": self._chat(chat_id, chat_type),
            "from": {"id": user_id, "is_bot": False, "first_name": "Ada",
                     "username": f"user{user_id}"}}
        if document:
            message["document"] = {"file_id": f"photo-{message_id}", "file_size": size,
                                   "file_unique_id": f"up{message_id}", "mime_type": document,
                                   "file_name": "picture"}
        else:
            width, height = _picture_size(data)
            message["photo"] = [
                {"file_id": f"thumb-{message_id}", "file_unique_id": f"ut{message_id}",
                 "file_size": 35, "width": 90, "height": 90 * height // width or 1},
                {"file_id": f"photo-{message_id}", "file_unique_id": f"up{message_id}",
                 "file_size": size, "width": width, "height": height}]
        if caption is not None:
            message["caption"] = caption
            if caption.startswith("/"):
                message["caption_entities"] = [{"type": "bot_command", "offset": 0, "length":
                                                _utf16_len(caption.split(maxsplit=1)[0])}]
        self._messages[(chat_id, message_id)] = message
        self._push({"message": message})
        self.update_of[(chat_id, message_id)] = self._updates[-1]["update_id"]
        return message

    def press(self, message: dict[str, Any], data: str, *, user_id: int,
              first_name: str = "Ada") -> str:
        """Queue a press of a button on a bot ``message`` (``sent(...)[i]``); returns its id."""
        query_id = str(next(self._query_ids))
        self._push({"callback_query": {
            "id": query_id, "chat_instance": "ci-1", "data": data, "message": message,
            "from": {"id": user_id, "is_bot": False, "first_name": first_name},
        }})
        return query_id

    def fail_next(self, method: str, status: int = 502, *, retry_after: int | None = None,
                  description: str | None = None, times: int = 1) -> None:
        """The next ``times`` calls of ``method`` fail (429 with ``retry_after``, 5xx, 403...)."""
        text = description or (f"Too Many Requests: retry after {retry_after or 1}"
                               if status == 429 else f"Error {status}")
        self._failures.setdefault(method, []).extend(
            _Failure(status, text, retry_after) for _ in range(times))

    # -- what tests read -------------------------------------------------------------------
    def calls_to(self, method: str, *, ok_only: bool = False) -> list[Call]:
        return [c for c in self.calls if c.method == method and (c.status == 200 or not ok_only)]

    def sent(self, method: str) -> list[dict[str, Any]]:
        """The messages the server created for successful ``method`` calls (for ``press``)."""
        return [c.result for c in self.calls_to(method, ok_only=True)]

    def methods(self, *, ignore: tuple[str, ...] = ("getUpdates",)) -> list[str]:
        return [c.method for c in self.calls if c.method not in ignore]

    async def wait_for(self, method: str, count: int = 1, *, timeout: float = 5.0,
                       where: Callable[[Call], bool] | None = None) -> Call:
        """Wait until ``method`` was called ``count`` times (matching ``where``); the last one."""
        def matching() -> list[Call]:
            return [c for c in self.calls if c.method == method and (where is None or where(c))]

        await self.wait_until(lambda: len(matching()) >= count, timeout=timeout,
                              what=f"{count} × {method}")
        return matching()[count - 1]

    async def wait_until(self, predicate: Callable[[], bool], *, timeout: float = 5.0,
                         what: str = "condition") -> None:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            seen = ", ".join(self.methods()) or "nothing"
            raise AssertionError(f"timed out waiting for {what}; calls: {seen}") from None

    # -- the server ------------------------------------------------------------------------
    def _chat(self, chat_id: int, chat_type: str | None) -> dict[str, Any]:
        if chat_id not in self._chats or chat_type is not None:
            kind = chat_type or ("private" if chat_id > 0 else "supergroup")
            chat: dict[str, Any] = {"id": chat_id, "type": kind}
            if kind == "private":
                chat["first_name"] = "Ada"
            else:
                chat["title"] = f"Group {chat_id}"
            self._chats[chat_id] = chat
        return self._chats[chat_id]

    def _push(self, update: dict[str, Any]) -> None:
        update["update_id"] = next(self._update_ids)
        self._updates.append(update)
        self.sent_updates[update["update_id"]] = update  # kept: a test may send it again
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def outage(self, method: str, until: float) -> None:
        """Every call of ``method`` fails with 503 until ``until`` (``time.monotonic()``)."""
        self._down[method] = until

    def slow_next(self, method: str, seconds: float, *, times: int = 1) -> None:
        """The next ``times`` calls of ``method`` are carried out (a photo is posted) but
        answered only after ``seconds``, as Telegram does under load."""
        self._slow.setdefault(method, []).extend([seconds] * times)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        params, files = await _read_body(request)
        call = Call(method=method, token=request.match_info["token"], params=params, files=files)
        failures = self._failures.get(method)
        if time.monotonic() < self._down.get(method, 0.0):
            failures = [_Failure(503, "Service Unavailable", None)]
        if failures:
            failure = failures.pop(0)
            call.status = failure.status
            body: dict[str, Any] = {"ok": False, "error_code": failure.status,
                                    "description": failure.description}
            if failure.retry_after is not None:
                body["parameters"] = {"retry_after": failure.retry_after}
            return await self._answer(call, body, failure.status)
        if method == "getUpdates":
            result: Any = await self._get_updates(params)
        elif method == "getMe":
            result = BOT_USER
        elif method in _TRUE_METHODS:
            result = True
        elif method in ("sendMessage", "sendPhoto", "sendDocument"):
            result = self._sent(method, call)
        elif method == "sendMediaGroup":
            result = self._sent_group(call)
        elif method == "getFile" and call.params.get("file_id") in self.user_files:
            file_id = call.params["file_id"]
            result = {"file_id": file_id, "file_unique_id": f"u{file_id}",
                      "file_size": len(self.user_files[file_id]),
                      "file_path": f"photos/{file_id}.jpg"}
        elif method in ("editMessageText", "editMessageReplyMarkup", "editMessageCaption"):
            result = self._edited(call)
        else:
            call.status = 404
            return await self._answer(call, {"ok": False, "error_code": 404,
                                             "description": "Not Found: method not found"}, 404)
        call.result = result
        delays = self._slow.get(method)
        if delays:
            self.calls.append(call)  # carried out now: the answer is what is late
            await self._notify()
            await asyncio.sleep(delays.pop(0))
            return web.json_response({"ok": True, "result": result}, status=200)
        return await self._answer(call, {"ok": True, "result": result}, 200)

    async def _answer(self, call: Call, body: dict[str, Any], status: int) -> web.Response:
        self.calls.append(call)
        await self._notify()
        return web.json_response(body, status=status)

    async def _get_updates(self, params: dict[str, str]) -> list[dict[str, Any]]:
        self.polls.append(time.monotonic())
        offset = int(params.get("offset", "0") or 0)
        timeout = float(params.get("timeout", "0") or 0)
        if offset > 0:  # the Bot API forgets confirmed updates (negative offsets: not modelled)
            confirmed = [u for u in self._updates if u["update_id"] < offset]
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
            if confirmed and self.on_confirm is not None:
                self.on_confirm([u["update_id"] for u in confirmed])

        def pending() -> list[dict[str, Any]]:
            return [u for u in self._updates if u["update_id"] >= offset]

        try:
            async with self._changed:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: bool(pending()) or self._closing), timeout)
        except TimeoutError:
            pass
        updates = pending()
        now = time.monotonic()
        for update in updates:
            self.served.setdefault(update["update_id"], []).append(now)
        return updates

    def _sent(self, method: str, call: Call) -> dict[str, Any]:
        chat_id = int(call.params["chat_id"])
        message: dict[str, Any] = {"message_id": next(self._message_ids), "date": int(time.time()),
                                   "chat": self._chat(chat_id, None), "from": BOT_USER}
        if method == "sendMessage":
            message["text"] = call.params.get("text", "")
        else:
            if "caption" in call.params:
                message["caption"] = call.params["caption"]
            upload = call.upload("photo" if method == "sendPhoto" else "document")
            file = {"file_id": f"file-{message['message_id']}", "file_size": len(upload.data),
                    "file_unique_id": f"u{message['message_id']}"}
            if method == "sendPhoto":
                message["photo"] = [{**file, "width": 256, "height": 256}]
            else:
                message["document"] = {**file, "file_name": upload.filename}
        markup = call.json("reply_markup")
        if markup:
            message["reply_markup"] = markup
        reply = call.json("reply_parameters")
        if isinstance(reply, dict):
            replied = self._messages.get((chat_id, int(reply["message_id"])))
            if replied is not None:
                message["reply_to_message"] = replied
        self._messages[(chat_id, message["message_id"])] = message
        return message

    def _sent_group(self, call: Call) -> list[dict[str, Any]]:
        """An album: one Message per item (photos or documents), sharing a media_group_id,
        each replying like ``_sent`` does; the caption stays on the item that had it."""
        chat_id = int(call.params["chat_id"])
        group_id = f"album-{next(self._message_ids)}"
        reply = call.json("reply_parameters")
        replied = (self._messages.get((chat_id, int(reply["message_id"])))
                   if isinstance(reply, dict) else None)
        messages = []
        for item, upload in call.media():
            message: dict[str, Any] = {
                "message_id": next(self._message_ids), "date": int(time.time()),
                "chat": self._chat(chat_id, None), "from": BOT_USER,
                "media_group_id": group_id}
            file = {"file_id": f"file-{message['message_id']}", "file_size": len(upload.data),
                    "file_unique_id": f"u{message['message_id']}"}
            if item["type"] == "photo":
                message["photo"] = [{**file, "width": 256, "height": 256}]
            else:
                message["document"] = {**file, "file_name": upload.filename}
            if "caption" in item:
                message["caption"] = item["caption"]
            if replied is not None:
                message["reply_to_message"] = replied
            self._messages[(chat_id, message["message_id"])] = message
            messages.append(message)
        return messages

    def _edited(self, call: Call) -> dict[str, Any] | bool:
        key = (int(call.params.get("chat_id", "0")), int(call.params.get("message_id", "0")))
        message = self._messages.get(key)
        if message is None:
            return True
        message = dict(message)
        if "text" in call.params:
            message["text"] = call.params["text"]
        markup = call.json("reply_markup")
        if markup:
            message["reply_markup"] = markup
        else:
            message.pop("reply_markup", None)
        self._messages[key] = message
        return message

    async def _file(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        file_id = path.removeprefix("photos/").removesuffix(".jpg")
        data = self.user_files.get(file_id) if path.startswith("photos/") else None
        self.calls.append(Call(method="file", token=request.match_info["token"],
                               params={"path": path}, files={},
                               status=404 if data is None else 200))
        await self._notify()
        return web.Response(status=404) if data is None else web.Response(body=data)


async def _read_body(request: web.Request) -> tuple[dict[str, str], dict[str, Upload]]:
    """Form-encoded, multipart or JSON bodies, as PTB (or anything else) may send them."""
    params: dict[str, str] = dict(request.query)
    files: dict[str, Upload] = {}
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        async for part in reader:
            data = await part.read()  # type: ignore[union-attr]
            if part.filename is not None:  # type: ignore[union-attr]
                files[part.name or ""] = Upload(part.filename,  # type: ignore[union-attr]
                                                part.headers.get("Content-Type", ""), bytes(data))
            else:
                params[part.name or ""] = bytes(data).decode("utf-8")
    elif request.content_type == "application/json":
        body = await request.json() if request.can_read_body else {}
        params.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in body.items()})
    elif request.can_read_body:
        params.update({k: str(v) for k, v in (await request.post()).items()})
    return params, files


def _picture_size(data: bytes) -> tuple[int, int]:
    """Width and height of a picture (256×256 for bytes that are none)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:
        return 256, 256


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2
