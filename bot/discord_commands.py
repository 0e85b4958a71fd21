"""The slash commands. Option ranges come from the config's limits, so Discord itself refuses
out-of-range numbers before the bot sees them; the ``--flags`` typed in the prompt go through the
shared grammar. Every command answers through the adapter; errors go to the tree's ``on_error``.

(No ``from __future__ import annotations`` here: discord.py reads these annotations at runtime,
and the ``Range`` bounds are closure variables.)
"""


import discord
from discord import app_commands

from bot import language, render
from bot.discord_i18n import lstr
from engine.config import STRENGTH_MIN, LimitsSection

ASPECTS = [(lstr("1:1 square"), "1:1"), (lstr("3:2 landscape"), "3:2"),
           (lstr("2:3 portrait"), "2:3"), (lstr("4:3 landscape"), "4:3"),
           (lstr("3:4 portrait"), "3:4"), (lstr("16:9 wide"), "16:9"), (lstr("9:16 tall"), "9:16")]
LANGUAGES = [(lstr("Chinese (中文)"), "zh"), (lstr("English"), "en"),
             (lstr("Each person's own language"), "auto")]


class NotAdmin(app_commands.CheckFailure):
    """An admin command used by someone who is not in the config's admin list."""


def _adapter(interaction: discord.Interaction):  # -> DiscordAdapter (kept untyped: no cycle)
    return interaction.client.adapter  # type: ignore[attr-defined]


def _admin_only(interaction: discord.Interaction) -> bool:
    if not _adapter(interaction).engine.is_admin(_adapter(interaction).user_of(interaction)):
        raise NotAdmin(render.admin_only())
    return True


def build_commands(limits: LimitsSection) -> list[app_commands.Command]:
    """Every slash command, with option limits taken from ``limits``."""
    Seed = app_commands.Range[int, limits.seed_min, limits.seed_max]
    Steps = app_commands.Range[int, limits.steps_min, limits.steps_max]
    Guidance = app_commands.Range[float, limits.guidance_min, limits.guidance_max]
    Prompt = app_commands.Range[str, 1, min(6000, limits.max_prompt_chars + 200)]
    Count = app_commands.Range[int, 1, limits.images_max]
    Strength = app_commands.Range[float, STRENGTH_MIN, 1.0]

    @app_commands.command(description=lstr("Make an image from a prompt (--seed, --steps, --ar "
                                           "work inside the prompt too)."))
    @app_commands.describe(prompt=lstr("What to draw; may end with --seed N --steps N --ar W:H"),
                           seed=lstr("Same seed + same prompt = same image (random if left out)"),
                           steps=lstr("More steps: more detail, slower (default {default})",
                                      default=limits.steps_default),
                           aspect=lstr("Shape of the image"),
                           guidance=lstr("How closely to follow the prompt (default {default})",
                                         default=format(limits.guidance_default, "g")),
                           n=lstr("How many images at once"),
                           image=lstr("A picture to start from (PNG, JPEG or WebP); its shape is "
                                      "kept unless aspect is given"),
                           strength=lstr("With an image: how far to move from it (default "
                                         "{default}; lower keeps more)",
                                         default=format(limits.strength_default, "g")),
                           style=lstr("A style the admins set up (see /styles)"))
    @app_commands.choices(aspect=[app_commands.Choice(name=n, value=v) for n, v in ASPECTS])
    async def imagine(interaction: discord.Interaction, prompt: Prompt,
                      seed: Seed | None = None, steps: Steps | None = None,
                      aspect: app_commands.Choice[str] | None = None,
                      guidance: Guidance | None = None, n: Count | None = None,
                      image: discord.Attachment | None = None,
                      strength: Strength | None = None, style: str | None = None) -> None:
        options = {"seed": seed, "steps": steps, "guidance": guidance, "n": n,
                   "strength": strength, "style": style,
                   "aspect": aspect.value if aspect else None}
        await _adapter(interaction).imagine(interaction, prompt, options, image)

    @imagine.autocomplete("style")
    async def style_names(interaction: discord.Interaction,
                          current: str) -> list[app_commands.Choice[str]]:
        """The configured styles whose name starts with what was typed (Discord shows 25)."""
        names = sorted(_adapter(interaction).config.styles)
        typed = current.strip().lower()
        return [app_commands.Choice(name=name, value=name)
                for name in names if name.startswith(typed)][:25]

    @app_commands.command(name="styles",
                          description=lstr("The styles you can add with --style."))
    async def styles(interaction: discord.Interaction) -> None:
        adapter = _adapter(interaction)
        await adapter.say(interaction, render.styles_list(adapter.config.styles))

    @app_commands.command(name="queue", description=lstr("Your images waiting or being drawn."))
    async def queue(interaction: discord.Interaction) -> None:
        await _adapter(interaction).show_queue(interaction)

    @app_commands.command(
        description=lstr("Cancel one of your images (your latest if no id is given)."))
    @app_commands.describe(job=lstr("The job id shown by /queue"))
    async def cancel(interaction: discord.Interaction, job: str | None = None) -> None:
        await _adapter(interaction).cancel(interaction, job)

    @app_commands.command(name="limits",
                          description=lstr("How many images you have left, and when more free "
                                           "up."))
    async def limits_(interaction: discord.Interaction) -> None:
        await _adapter(interaction).show_limits(interaction)

    @app_commands.command(name="help", description=lstr("How to use /imagine."))
    async def help_(interaction: discord.Interaction) -> None:
        await _adapter(interaction).say(interaction, render.usage(limits))

    return [imagine, queue, cancel, limits_, help_, styles, *_admin_commands()]


def _admin_commands() -> list[app_commands.Command]:
    @app_commands.command(description=lstr("Admins: queue, running job, GPU memory, last error."))
    @app_commands.check(_admin_only)
    async def status(interaction: discord.Interaction) -> None:
        adapter = _adapter(interaction)
        await adapter.say(interaction, render.status(adapter.engine.health()))

    @app_commands.command(description=lstr("Admins: the last day's and week's images, GPU time, "
                                           "failures, waits and top users."))
    @app_commands.check(_admin_only)
    async def stats(interaction: discord.Interaction) -> None:
        adapter = _adapter(interaction)  # answered privately: ids may be shown
        await adapter.say(interaction, render.stats(await adapter.engine.stats(), md=True))

    @app_commands.command(
        description=lstr("Admins: stop starting new images (the queue keeps them)."))
    @app_commands.check(_admin_only)
    async def pause(interaction: discord.Interaction) -> None:
        _adapter(interaction).engine.pause()
        await _adapter(interaction).say(interaction, render.queue_paused())

    @app_commands.command(description=lstr("Admins: start drawing queued images again."))
    @app_commands.check(_admin_only)
    async def resume(interaction: discord.Interaction) -> None:
        _adapter(interaction).engine.resume()
        await _adapter(interaction).say(interaction, render.queue_resumed())

    @app_commands.command(
        description=lstr("Admins: set a user's images per window (empty = default)."))
    @app_commands.describe(user=lstr("Whose limit to change"),
                           images=lstr("Images per window; leave empty for the default"))
    @app_commands.check(_admin_only)
    async def limit(interaction: discord.Interaction, user: discord.User,
                    images: app_commands.Range[int, 0, 100_000] | None = None) -> None:
        await _adapter(interaction).set_limit(interaction, user, images)

    @app_commands.command(name="language",
                          description=lstr("Admins: the language of the bot's replies in this "
                                           "channel."))
    @app_commands.describe(choice=lstr("Chinese, English, or each person's own language"))
    @app_commands.choices(choice=[app_commands.Choice(name=n, value=v) for n, v in LANGUAGES])
    @app_commands.check(_admin_only)
    async def language_(interaction: discord.Interaction,
                        choice: app_commands.Choice[str]) -> None:
        adapter = _adapter(interaction)
        text = await language.set_for_chat(adapter.engine, "discord", interaction.channel_id or 0,
                                           choice.value)
        await adapter.say(interaction, text)

    return [status, stats, pause, resume, limit, language_]
