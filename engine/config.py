"""Typed configuration, loaded from TOML.

Every field's default here equals ``config.example.toml`` (a test holds them together), so the bot
runs with no config file at all. A bad value names the key, the value and what is allowed.
Tokens may also come from the environment (``DISCORD_TOKEN``, ``TELEGRAM_TOKEN``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.moderation import DEFAULT_LABELS, LABELS, POLICIES

if TYPE_CHECKING:  # pragma: no cover
    from engine.request import User

DEFAULT_CONFIG_PATH = Path("config.toml")
SEED_MAX = 2**32 - 1
BACKENDS = ("flux", "dry-run")
LOCAL_PLATFORMS = ("console", "cli")
PRESETS = ("auto", "low", "balanced", "max")


class ConfigError(ValueError):
    """The configuration file is unreadable or holds a value that is not allowed."""


@dataclass
class EngineSection:
    backend: str = "flux"
    database: str = "data/bot.sqlite3"
    output_dir: str = "outputs"
    save_outputs: bool = True
    keep_outputs_days: float = 30.0  # 0 = keep everything
    max_queue_total: int = 50
    max_queue_per_user: int = 3
    job_timeout_s: float = 600.0
    shutdown_grace_s: float = 60.0
    dry_run_step_s: float = 0.05


# One message holds at most this many images (Telegram's media group allows 10; a 2×2 grid is
# what people expect), and image-to-image below this strength would change nothing visible.
MAX_IMAGES_PER_JOB = 4
STRENGTH_MIN = 0.05


@dataclass
class LimitsSection:
    steps_min: int = 1
    steps_max: int = 50
    steps_default: int = 20
    seed_min: int = 0
    seed_max: int = SEED_MAX
    width_default: int = 1024
    height_default: int = 1024
    max_pixels: int = 1_048_576
    min_side: int = 256
    size_multiple: int = 16
    guidance_min: float = 1.0
    guidance_max: float = 10.0
    guidance_default: float = 3.5
    max_prompt_chars: int = 1000
    # Image-to-image from a picture the user sends: --strength when none is given, and the
    # largest file taken (refused before the download where the platform tells its size).
    strength_default: float = 0.6
    input_max_bytes: int = 10 * 1024 * 1024
    images_default: int = 1  # --n: images per command, run together
    images_max: int = 4
    vary_subtle_strength: float = 0.35  # "Vary (subtle)": image-to-image strength
    vary_strong_strength: float = 0.7
    upscale_strength: float = 0.3  # "Upscale": how much each tile of the 2× image is redrawn


@dataclass
class RateLimitSection:
    images_per_window: int = 10
    window_s: float = 3600.0
    # "gpu_seconds": limits count images of the default size (engine/costs.py), not images
    mode: str = "images"
    per_chat_images_per_window: int = 0  # a Discord server or Telegram group as a whole
    images_per_day: int = 0  # per user, over the last 24 hours


RATE_LIMIT_MODES = ("images", "gpu_seconds")


@dataclass
class AccessSection:
    discord_admins: list[str] = field(default_factory=list)
    telegram_admins: list[str] = field(default_factory=list)
    discord_guilds: list[str] = field(default_factory=list)
    discord_channels: list[str] = field(default_factory=list)
    telegram_chats: list[str] = field(default_factory=list)
    banned_words: list[str] = field(default_factory=list)

    def admins_for(self, platform: str) -> list[str]:
        return {"discord": self.discord_admins, "telegram": self.telegram_admins}.get(platform, [])

    def is_admin(self, user: User) -> bool:
        """Listed for the user's platform, or at the machine's own console or command line
        (whoever types there owns the bot)."""
        return user.platform in LOCAL_PLATFORMS or user.user_id in self.admins_for(user.platform)


@dataclass
class ModelSection:
    preset: str = "auto"
    vram_limit_gib: float = 0.0  # 0 = let the preset decide
    device: str = "cuda"
    models_dir: str = "models"
    offline: bool = False
    compile: bool = True
    dit_streaming: bool = True
    # float8 matmuls in the DiT's blocks: "auto" (where measured to pay: streamed with
    # layer_cast, compiled, on a GPU with float8 tensor cores), true (also max, eager), false
    float8_compute: str | bool = "auto"
    expandable_segments: bool = True
    batch_images: int = 1  # images of the largest size a DiT block computes at once (--n jobs)
    prompt_cache: int = 32  # prompts whose text embeddings stay in host memory (0 = off)
    park_models: bool = True  # CLIP, the VAE, T5's embedding on the GPU only in their phase
    layer_cast: bool = True  # the DiT's layers cast their own float8 weights (no work buffer)
    dit_model_id: str = "MAILAND/majicflus_v1"
    dit_file: str = "majicflus_v134.safetensors"
    flux_model_id: str = "black-forest-labs/FLUX.1-dev"
    # Local paths that replace the download of one entry ("" = download into models_dir).
    dit_path: str = ""
    text_encoder_path: str = ""
    text_encoder_2_path: str = ""
    vae_path: str = ""
    tokenizer_path: str = ""
    tokenizer_2_path: str = ""


@dataclass
class DiscordSection:
    token: str = ""
    sync_guild_ids: list[str] = field(default_factory=list)
    progress_interval_s: float = 1.5


@dataclass
class TelegramSection:
    token: str = ""
    base_url: str = ""
    base_file_url: str = ""
    plain_text_prompts: bool = True
    send_png_document: bool = False
    progress_interval_s: float = 3.0
    read_timeout_s: float = 20.0


@dataclass
class DeliverySection:
    attempts: int = 5
    first_delay_s: float = 2.0
    max_delay_s: float = 300.0
    give_up_after_s: float = 86400.0


@dataclass
class BotSection:
    """How the bot talks: replies follow the chat's override (``/language``), else the user's
    own language (Discord's locale, Telegram's language_code), else this default."""

    default_language: str = "en"  # "en" or "zh" (Simplified Chinese)


BOT_LANGUAGES = ("en", "zh")


@dataclass
class ConsoleSection:
    enabled: str = "auto"  # "auto": only when no chat token is set; "always"; "never"


@dataclass
class ClusterSection:
    """GPU workers on other cards or hosts through NATS JetStream (engine/cluster/)."""

    url: str = ""  # "" = this process runs the jobs on its own GPU (no server needed)
    name: str = "flux"  # prefix of the streams, buckets and subjects on the server
    credentials: str = ""  # a NATS .creds file (a user JWT and its NKey seed)
    tls_ca: str = ""  # CA file that signed the server's certificate (tls:// URLs)
    worker_name: str = ""  # "" = host name and process id
    ack_wait_s: float = 30.0  # a worker's lease on a job, renewed while the job runs
    max_deliver: int = 3  # tries of a job before it goes to the dead-letter stream
    heartbeat_s: float = 5.0
    worker_ttl_s: float = 20.0  # a worker unheard of for this long has left
    result_ttl_s: float = 86400.0  # finished images kept on the server for the bot


CLUSTER_URL_SCHEMES = ("nats://", "tls://", "ws://", "wss://")


@dataclass
class ModerationSection:
    nsfw_check: bool = False  # opt-in: needs the nsfw extra (NudeNet)
    policy: str = "block"  # for a flagged image: allow | spoiler | block
    threshold: float = 0.5  # a detection counts from this score
    labels: list[str] = field(default_factory=lambda: list(DEFAULT_LABELS))
    # Per-chat policies: Discord guild id / Telegram chat id -> allow | spoiler | block.
    discord_guilds: dict[str, str] = field(default_factory=dict)
    telegram_chats: dict[str, str] = field(default_factory=dict)


@dataclass
class StyleSection:
    """One ``[styles.<name>]`` table: a LoRA users pick with ``--style <name>``."""

    file: str = ""  # a local .safetensors path, or the file inside model_id's repository
    model_id: str = ""  # a ModelScope model id: file is downloaded into models_dir like the base
    alpha: float = 1.0  # the LoRA's weight: out + alpha·(x·Aᵀ)·Bᵀ
    trigger: str = ""  # words put before the prompt when the style is used
    description: str = ""  # one line, shown by /styles and Discord's autocomplete


STYLE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
STYLE_ALPHA_MAX = 4.0
STYLE_DESCRIPTION_MAX = 100  # Discord's autocomplete choices show at most 100 characters


@dataclass
class Config:
    engine: EngineSection = field(default_factory=EngineSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    rate_limit: RateLimitSection = field(default_factory=RateLimitSection)
    access: AccessSection = field(default_factory=AccessSection)
    model: ModelSection = field(default_factory=ModelSection)
    discord: DiscordSection = field(default_factory=DiscordSection)
    telegram: TelegramSection = field(default_factory=TelegramSection)
    delivery: DeliverySection = field(default_factory=DeliverySection)
    console: ConsoleSection = field(default_factory=ConsoleSection)
    bot: BotSection = field(default_factory=BotSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    moderation: ModerationSection = field(default_factory=ModerationSection)
    styles: dict[str, StyleSection] = field(default_factory=dict)  # none by default

    @property
    def discord_token(self) -> str:
        return os.environ.get("DISCORD_TOKEN") or self.discord.token

    @property
    def telegram_token(self) -> str:
        return os.environ.get("TELEGRAM_TOKEN") or self.telegram.token


def load_config(path: str | Path | None = None) -> Config:
    """Read ``path`` (default ``config.toml``); a missing default file means all defaults."""
    target = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    if not target.exists():
        if path is not None:
            raise ConfigError(f"config file {target} does not exist (copy config.example.toml)")
        return _validated(Config())
    try:
        data = tomllib.loads(target.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{target} is not valid TOML: {exc}") from None
    except PermissionError:
        raise ConfigError(
            f"{target} cannot be read by this user (uid {os.getuid()}): give it to that user "
            f"(chown {os.getuid()} {target}; keep chmod 600), or run the bot as the file's "
            "owner") from None
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> Config:
    return _validated(_build(Config, data, ""))


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(f"unknown setting {dotted!r}; {hint}allowed: "
                              f"{', '.join(sorted(names))}")
        values[key] = _coerce(hints[key], raw, dotted)
    return cls(**values)


_KIND = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _coerce(hint: Any, raw: Any, key: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, raw, key)
    origin = typing.get_origin(hint)
    if origin in (list, dict):
        return _coerce_container(origin, hint, raw, key)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(typing.get_args(hint), raw, key)
    if hint is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"{key} = {raw!r} must be true or false")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{key} = {raw!r} must be a whole number")
        return raw
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(f"{key} = {raw!r} must be a number")
        return float(raw)
    if hint is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{key} = {raw!r} must be a string")
        return raw
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover


def _coerce_union(options: tuple[Any, ...], raw: Any, key: str) -> Any:
    """The first of the types the value is, in order (``str | bool``: "auto", true, false)."""
    for option in options:
        try:
            return _coerce(option, raw, key)
        except ConfigError:
            continue
    raise ConfigError(f"{key} = {raw!r} must be " + " or ".join(_KIND[t] for t in options))


def _coerce_container(origin: Any, hint: Any, raw: Any, key: str) -> Any:
    if origin is list:
        if not isinstance(raw, list):
            raise ConfigError(f"{key} = {raw!r} must be a list")
        # Ids are written as numbers or strings in TOML; keep them as strings.
        return [str(item) for item in raw]
    # a table whose keys are ids or names: each value by its own type
    if not isinstance(raw, dict):
        raise ConfigError(f"[{key}] = {raw!r} must be a table")
    value_hint = typing.get_args(hint)[1]
    return {str(k): _coerce(value_hint, v, f"{key}.{k}") for k, v in raw.items()}


def _validated(config: Config) -> Config:
    def need(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{key} = {value!r} is not allowed: {allowed}")

    e, lim, m = config.engine, config.limits, config.model
    need(e.backend in BACKENDS, "engine.backend", e.backend, " or ".join(BACKENDS))
    need(m.preset in PRESETS, "model.preset", m.preset, ", ".join(PRESETS))
    need(m.vram_limit_gib >= 0, "model.vram_limit_gib", m.vram_limit_gib, "0 (auto) or more GiB")
    need(1 <= m.batch_images <= 8, "model.batch_images", m.batch_images, "1 to 8 images")
    need(m.float8_compute in ("auto", True, False), "model.float8_compute", m.float8_compute,
         '"auto", true or false')
    need(0 <= m.prompt_cache <= 1024, "model.prompt_cache", m.prompt_cache,
         "0 to 1024 prompts (4 MiB of host memory each)")
    need(e.max_queue_total >= 1, "engine.max_queue_total", e.max_queue_total, "at least 1")
    need(e.max_queue_per_user >= 1, "engine.max_queue_per_user", e.max_queue_per_user, "at least 1")
    need(e.job_timeout_s > 0, "engine.job_timeout_s", e.job_timeout_s, "more than 0 seconds")
    need(1 <= lim.steps_min <= lim.steps_default <= lim.steps_max, "limits.steps_default",
         lim.steps_default, "between steps_min and steps_max")
    need(0 <= lim.seed_min <= lim.seed_max <= SEED_MAX, "limits.seed_max", lim.seed_max,
         f"seed_min..{SEED_MAX}")
    need(lim.size_multiple >= 1, "limits.size_multiple", lim.size_multiple, "at least 1")
    for key in ("width_default", "height_default"):
        value = getattr(lim, key)
        need(value % lim.size_multiple == 0 and value >= lim.min_side, f"limits.{key}", value,
             f"a multiple of {lim.size_multiple}, at least {lim.min_side}")
    need(lim.width_default * lim.height_default <= lim.max_pixels, "limits.max_pixels",
         lim.max_pixels, "at least width_default × height_default")
    need(lim.guidance_min <= lim.guidance_default <= lim.guidance_max, "limits.guidance_default",
         lim.guidance_default, "between guidance_min and guidance_max")
    need(STRENGTH_MIN <= lim.strength_default <= 1.0, "limits.strength_default",
         lim.strength_default, f"from {STRENGTH_MIN} to 1.0")
    need(lim.input_max_bytes >= 1, "limits.input_max_bytes", lim.input_max_bytes, "at least 1")
    need(lim.max_prompt_chars >= 1, "limits.max_prompt_chars", lim.max_prompt_chars, "at least 1")
    need(1 <= lim.images_default <= lim.images_max <= MAX_IMAGES_PER_JOB, "limits.images_max",
         lim.images_max, f"between images_default (at least 1) and {MAX_IMAGES_PER_JOB}")
    for key in ("vary_subtle_strength", "vary_strong_strength", "upscale_strength"):
        need(STRENGTH_MIN <= getattr(lim, key) <= 1.0, f"limits.{key}", getattr(lim, key),
             f"from {STRENGTH_MIN} to 1.0")
    need(config.rate_limit.images_per_window >= 0, "rate_limit.images_per_window",
         config.rate_limit.images_per_window, "0 (no limit) or more")
    need(config.rate_limit.window_s > 0, "rate_limit.window_s", config.rate_limit.window_s,
         "more than 0 seconds")
    need(config.rate_limit.mode in RATE_LIMIT_MODES, "rate_limit.mode", config.rate_limit.mode,
         " or ".join(RATE_LIMIT_MODES))
    for key in ("per_chat_images_per_window", "images_per_day"):
        need(getattr(config.rate_limit, key) >= 0, f"rate_limit.{key}",
             getattr(config.rate_limit, key), "0 (no cap) or more")
    need(config.delivery.attempts >= 1, "delivery.attempts", config.delivery.attempts, "at least 1")
    for key in ("first_delay_s", "max_delay_s"):
        need(getattr(config.delivery, key) > 0, f"delivery.{key}", getattr(config.delivery, key),
             "more than 0 seconds")
    keep_s = e.keep_outputs_days * 86400
    need(e.keep_outputs_days == 0 or keep_s >= max(config.rate_limit.window_s,
                                                   config.delivery.give_up_after_s),
         "engine.keep_outputs_days", e.keep_outputs_days,
         "0 (keep everything) or at least the rate-limit window and delivery.give_up_after_s")
    need(config.console.enabled in ("auto", "always", "never"), "console.enabled",
         config.console.enabled, "auto, always or never")
    need(config.bot.default_language in BOT_LANGUAGES, "bot.default_language",
         config.bot.default_language, " or ".join(BOT_LANGUAGES))
    _validate_moderation(config.moderation, need)
    _validate_cluster(config.cluster, need)
    _validate_styles(config.styles, need)
    return config


def _validate_styles(styles: dict[str, StyleSection],
                     need: Callable[[bool, str, Any, str], None]) -> None:
    for name, style in styles.items():
        key = f"styles.{name}"
        need(STYLE_NAME.fullmatch(name) is not None, "styles", name,
             "style names are 1-32 lower-case letters, digits, - or _ (typed after --style)")
        need(style.file.endswith(".safetensors"), f"{key}.file", style.file,
             "a .safetensors LoRA file (a local path, or a file of model_id on ModelScope)")
        need(style.model_id == "" or style.model_id.count("/") == 1, f"{key}.model_id",
             style.model_id, '"" (file is a local path) or a ModelScope id such as "owner/name"')
        need(style.alpha != 0 and abs(style.alpha) <= STYLE_ALPHA_MAX, f"{key}.alpha",
             style.alpha, f"a weight from -{STYLE_ALPHA_MAX:g} to {STYLE_ALPHA_MAX:g}, not 0")
        need("\n" not in style.trigger and len(style.trigger) <= 200, f"{key}.trigger",
             style.trigger, "one line of at most 200 characters")
        need("\n" not in style.description
             and len(style.description) <= STYLE_DESCRIPTION_MAX, f"{key}.description",
             style.description, f"one line of at most {STYLE_DESCRIPTION_MAX} characters")


def _url_parts(url: str) -> tuple[str, str, str, str] | None:
    """(scheme, what shows of the user: "user:" or "", secret, host) of a URL that carries a
    secret: the password of ``tls://user:password@host`` or the token of ``tls://token@host``
    (nats-py reads a name alone as a token). None when it carries none."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at:
        return None
    user, colon, secret = userinfo.partition(":")
    return (scheme, user + colon, secret, host) if colon else (scheme, "", userinfo, host)


def public_url(url: str) -> str:
    """``url`` to show or log, its secret as ``***``."""
    parts = _url_parts(url)
    if parts is None:
        return url
    scheme, user, _secret, host = parts
    return f"{scheme}://{user}***@{host}"


def url_secret(url: str) -> str:
    """The password or token a cluster URL carries ("" if none), for the log filter."""
    parts = _url_parts(url)
    return "" if parts is None else parts[2]


def _validate_cluster(c: ClusterSection, need: Callable[[bool, str, Any, str], None]) -> None:
    need(not c.url or c.url.startswith(CLUSTER_URL_SCHEMES), "cluster.url", public_url(c.url),
         "empty (no cluster) or a URL starting with " + ", ".join(CLUSTER_URL_SCHEMES))
    need(0 < len(c.name) <= 32 and all(ch.isascii() and (ch.isalnum() or ch in "-_")
                                       for ch in c.name), "cluster.name", c.name,
         "1 to 32 letters, digits, - or _")
    for key in ("ack_wait_s", "heartbeat_s", "result_ttl_s"):
        need(getattr(c, key) > 0, f"cluster.{key}", getattr(c, key), "more than 0 seconds")
    need(c.worker_ttl_s > c.heartbeat_s, "cluster.worker_ttl_s", c.worker_ttl_s,
         "more than heartbeat_s")
    need(c.max_deliver >= 1, "cluster.max_deliver", c.max_deliver, "at least 1")


def _validate_moderation(mod: ModerationSection, need: Callable[[bool, str, Any, str], None]) \
        -> None:
    allowed = " or ".join(POLICIES)
    need(mod.policy in POLICIES, "moderation.policy", mod.policy, allowed)
    need(0 < mod.threshold <= 1, "moderation.threshold", mod.threshold,
         "more than 0, at most 1")
    need(bool(mod.labels), "moderation.labels", mod.labels, "at least one NudeNet label")
    for label in mod.labels:
        need(label in LABELS, "moderation.labels", label, "NudeNet's labels: "
             + ", ".join(LABELS))
    for table in ("discord_guilds", "telegram_chats"):
        for chat, policy in getattr(mod, table).items():
            need(chat.removeprefix("-").isdigit(), f"moderation.{table}", chat,
                 "keys are numeric ids (Discord guild ids, Telegram chat ids)")
            need(policy in POLICIES, f"moderation.{table}.{chat}", policy, allowed)
