"""The buttons under a Discord image: Re-roll, Same seed + more steps, Cancel.

They are persistent: the job id lives in the ``custom_id`` (``imagine:reroll:<job id>``), so a
button pressed after a restart is parsed again from its id (discord.py's ``DynamicItem``) and
the job is looked up in the journal. Views never time out.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import discord

from bot import render

if TYPE_CHECKING:  # pragma: no cover
    from bot.discord_adapter import DiscordAdapter

ACTIONS = ("reroll", "more", "cancel")
_STYLES = {"reroll": discord.ButtonStyle.primary, "more": discord.ButtonStyle.secondary,
           "cancel": discord.ButtonStyle.danger}
TEMPLATE = r"imagine:(?P<action>reroll|more|cancel):(?P<job>[0-9a-f]{1,32})"


def custom_id(action: str, job_id: str) -> str:
    return f"imagine:{action}:{job_id}"


class JobButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=TEMPLATE):
    """One button of one job; the adapter decides who may press it and what it does."""

    def __init__(self, action: str, job_id: str) -> None:
        super().__init__(discord.ui.Button(label=render.button_label(action),
                                           style=_STYLES[action],
                                           custom_id=custom_id(action, job_id)))
        self.action = action
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button[Any],
                             match: re.Match[str], /) -> JobButton:
        return cls(match["action"], match["job"])

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        return await _adapter(interaction).button_allowed(interaction, self.action, self.job_id)

    async def callback(self, interaction: discord.Interaction) -> None:
        await _adapter(interaction).on_button(interaction, self.action, self.job_id)


def _adapter(interaction: discord.Interaction) -> DiscordAdapter:
    return interaction.client.adapter  # type: ignore[attr-defined, no-any-return]


def job_view(job_id: str, *actions: str) -> discord.ui.View:
    """A view holding ``actions`` (e.g. "cancel" while waiting, "reroll", "more" under a result)."""
    view = discord.ui.View(timeout=None)
    for action in actions:
        view.add_item(JobButton(action, job_id))
    return view
