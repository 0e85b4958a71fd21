"""The inline buttons under Telegram messages, and what a press's data says.

Callback data is at most 64 bytes, so each button names its action and the job by id only; a
press looks the job up in the journal (``engine.job_record``), so buttons work after a restart.

    cancel:<job>            the status message's Cancel
    reroll:<job>            the same request, a new seed
    more:<job>              the same seed, more steps (a job of one image)
    u:<job>:<n>             image n (1-based) alone, as a full-size PNG document
    v:<job>:<n>:s|t         a subtle (s) or strong (t) variation of image n
    up:<job>:<n>            image n at twice its size (``engine/upscale.py``)
"""

from __future__ import annotations

from dataclasses import dataclass

from telegram import InlineKeyboardButton, InlineKeyboardMarkup

from bot import render
from engine import variants
from engine.config import LimitsSection
from engine.request import ImageRequest
from engine.store import JobRecord

CANCEL, REROLL, MORE, ALONE, VARY, UPSCALE = "cancel", "reroll", "more", "u", "v", "up"
KINDS = {"s": "subtle", "t": "strong"}  # a variation's letter in the data -> its kind


@dataclass(frozen=True)
class Press:
    """What a button's data asks for; ``number`` is 1-based, as on the button."""

    action: str
    job_id: str
    number: int = 1
    kind: str = "subtle"


def parse_press(data: str) -> Press | None:
    """The press a button's data names; None for data this bot did not make (or an old one)."""
    action, *rest = data.split(":")
    if action in (CANCEL, REROLL, MORE) and len(rest) == 1 and rest[0]:
        return Press(action, rest[0])
    if action in (ALONE, UPSCALE) and len(rest) == 2 and rest[0] and _is_small_number(rest[1]):
        return Press(action, rest[0], int(rest[1]))
    if (action == VARY and len(rest) == 3 and rest[0] and _is_small_number(rest[1])
            and rest[2] in KINDS):
        return Press(action, rest[0], int(rest[1]), KINDS[rest[2]])
    return None


def _is_small_number(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 2


def _button(label: str, *data: object) -> InlineKeyboardButton:
    return InlineKeyboardButton(label, callback_data=":".join(str(part) for part in data))


def _vary(label: str, job_id: str, number: int, kind: str) -> InlineKeyboardButton:
    letter = next(k for k, v in KINDS.items() if v == kind)
    return _button(label, VARY, job_id, number, letter)


def cancel_keyboard(job_id: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[_button("✖ Cancel", CANCEL, job_id)]])


def result_keyboard(job_id: str, count: int = 1,
                    upscaled: bool = False) -> InlineKeyboardMarkup | None:
    """Under a result. A grid: U1…UN, V1…VN (subtle) and Re-roll. One image: Re-roll, Same
    seed more steps, both variations and Upscale. An upscale: none (its original has them)."""
    if upscaled:
        return None
    reroll = _button(render.button_label("reroll"), REROLL, job_id)
    if count > 1:
        numbers = range(1, count + 1)
        return InlineKeyboardMarkup([
            [_button(render.button_label(ALONE, n), ALONE, job_id, n) for n in numbers],
            [_vary(render.button_label(VARY, n), job_id, n, "subtle") for n in numbers],
            [reroll]])
    return InlineKeyboardMarkup([
        [reroll, _button(render.button_label("more"), MORE, job_id)],
        [_vary(render.vary_label(kind), job_id, 1, kind) for kind in KINDS.values()],
        [_button(render.upscale_label(), UPSCALE, job_id, 1)]])


def alone_keyboard(job_id: str, number: int) -> InlineKeyboardMarkup:
    """Under an image posted alone (U): its variations and its upscale (the job's buttons
    name image n)."""
    return InlineKeyboardMarkup([[_vary(render.vary_label(kind), job_id, number, kind)
                                  for kind in KINDS.values()],
                                 [_button(render.upscale_label(), UPSCALE, job_id, number)]])


def new_request(press: Press, record: JobRecord, limits: LimitsSection) -> ImageRequest:
    """The request a Re-roll, More or V press makes from its job (``InvalidCommand`` when it
    cannot: the most steps already, the image no longer kept)."""
    return variants.from_button(press.action, record, press.number - 1, press.kind, limits)


def queued_answer(press: Press, request: ImageRequest) -> str:
    """The answer to a press that queued ``request``."""
    if press.action == REROLL:
        return render.rerolling(request.seed)
    if press.action == MORE:
        return render.more_steps_queued(request.steps)
    if press.action == UPSCALE:
        return render.upscaling(press.number, request.width, request.height)
    return render.varying(press.kind, press.number, request.seed)
