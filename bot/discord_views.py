"""The buttons under a Discord image: Re-roll, Same seed + more steps, the variations, Cancel,
and under a grid of N images U1..UN (that image alone) and V1..VN (a subtle variation of it).

They are persistent: the job id lives in the ``custom_id`` (``imagine:reroll:<job id>``; for one
image of a job ``imagine:u:<job id>:<number>`` and ``imagine:v:<job id>:<number>:s|t``, 1-based,
subtle or strong), so a button pressed after a restart is parsed again from its id (discord.py's
``DynamicItem``) and the job is looked up in the journal. Views never time out.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import discord

from bot import render

if TYPE_CHECKING:  # pragma: no cover
    from bot.discord_adapter import DiscordAdapter

ACTIONS = ("reroll", "more", "cancel", "u", "v", "up")
_STYLES = {"reroll": discord.ButtonStyle.primary, "more": discord.ButtonStyle.secondary,
           "cancel": discord.ButtonStyle.danger, "u": discord.ButtonStyle.secondary,
           "v": discord.ButtonStyle.secondary, "up": discord.ButtonStyle.secondary}
# Well under Discord's 100 characters: "imagine:v:" + 32 + ":9:s".
TEMPLATE = (r"imagine:(?P<action>reroll|more|cancel|up|u|v):(?P<job>[0-9a-f]{1,32})"
            r"(?::(?P<number>[1-9])(?::(?P<kind>[st]))?)?")
_KINDS = {"s": "subtle", "t": "strong"}  # one letter in the id, the word everywhere else
_CODES = {word: code for code, word in _KINDS.items()}


def custom_id(action: str, job_id: str, number: int | None = None, kind: str = "") -> str:
    """``number``: which image of the job (1-based, U and V); ``kind``: "subtle" or "strong"."""
    tail = "" if number is None else f":{number}" + (f":{_CODES[kind]}" if kind else "")
    return f"imagine:{action}:{job_id}{tail}"


class JobButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=TEMPLATE):
    """One button of one job; the adapter decides who may press it and what it does."""

    def __init__(self, action: str, job_id: str, number: int | None = None, kind: str = "",
                 *, label: str | None = None, row: int | None = None) -> None:
        super().__init__(discord.ui.Button(label=label or render.button_label(action, number),
                                           style=_STYLES[action],
                                           custom_id=custom_id(action, job_id, number, kind)),
                         row=row)
        self.action = action
        self.job_id = job_id
        self.index = (number or 1) - 1  # 0-based, as the engine counts a job's images
        self.kind = kind or "subtle"

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button[Any],
                             match: re.Match[str], /) -> JobButton:
        number = int(match["number"]) if match["number"] else None
        return cls(match["action"], match["job"], number, _KINDS.get(match["kind"] or "", ""))

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        return await _adapter(interaction).button_allowed(interaction, self.action, self.job_id)

    async def callback(self, interaction: discord.Interaction) -> None:
        await _adapter(interaction).on_button(interaction, self.action, self.job_id,
                                              self.index, self.kind)


def _adapter(interaction: discord.Interaction) -> DiscordAdapter:
    return interaction.client.adapter  # type: ignore[attr-defined, no-any-return]


def job_view(job_id: str, *actions: str) -> discord.ui.View:
    """A view holding ``actions`` (e.g. "cancel" while waiting)."""
    view = discord.ui.View(timeout=None)
    for action in actions:
        view.add_item(JobButton(action, job_id))
    return view


def result_view(job_id: str, count: int, upscaled: bool = False) -> discord.ui.View:
    """Under a result. A grid: a row U1..UN, a row V1..VN, then Re-roll / More. One image:
    Re-roll, More, Vary (subtle), Vary (strong), Upscale. (At most 5 buttons a row: ``--n`` is
    1–4.) An upscale has none: its original has them."""
    view = discord.ui.View(timeout=None)
    if upscaled:
        return view
    if count > 1:
        for number in range(1, count + 1):
            view.add_item(JobButton("u", job_id, number, row=0))
        for number in range(1, count + 1):
            view.add_item(JobButton("v", job_id, number, "subtle", row=1))
    row = 2 if count > 1 else 0
    for action in ("reroll", "more"):
        view.add_item(JobButton(action, job_id, row=row))
    if count == 1:
        _add_variations(view, job_id, 1, row)
        view.add_item(JobButton("up", job_id, 1, label=render.upscale_label(), row=row))
    return view


def alone_view(job_id: str, number: int) -> discord.ui.View:
    """Under one image of a grid posted alone (U): its two variations and its upscale."""
    view = discord.ui.View(timeout=None)
    _add_variations(view, job_id, number, 0)
    view.add_item(JobButton("up", job_id, number, label=render.upscale_label(), row=0))
    return view


def _add_variations(view: discord.ui.View, job_id: str, number: int, row: int) -> None:
    for kind in ("subtle", "strong"):
        view.add_item(JobButton("v", job_id, number, kind, label=render.vary_label(kind),
                                row=row))
