"""The ``/imagine`` command grammar: chat text -> validated ``ParsedCommand`` -> ``ImageRequest``.

    [/imagine[@BotName]] PROMPT [OPTION ...]
    PROMPT = "quoted text" | text up to the first OPTION
    OPTION = --name VALUE | --name=VALUE   (case-insensitive; a long dash — or – may stand for --)
    names  = --seed N, --steps N, --ar W:H (alias --aspect), --size WxH (also W×H, W*H),
             --guidance X (alias --cfg), --n N (alias --images),
             --strength X (only with an image to start from: ``engine/input_image.py``),
             --style NAME (a configured LoRA style; the engine refuses unknown ones)

The whole text is cleaned first (``clean_prompt``). An option token is a word that starts with
``--``/``—``/``–`` followed by an ASCII letter; the prompt ends before the first one. A prompt that
starts with a quote (" ' “ „ « ‘) is quoted when a matching closing quote is followed by the end of
the text or by an option; the first such closing quote ends it. Otherwise quotes are plain text.

Every option may be given once (``--ar`` and ``--aspect`` are one option); ``--ar`` and ``--size``
exclude each other. ``--ar`` sizes: see ``aspect_to_size``. Every bad input raises
``InvalidCommand`` with one sentence that says what is wrong and what is allowed: a whole
message id (``engine/errors.py``), whose option is named as typed ("--steps") or by a phrase
translated with it ("the seed option").
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import random
import re
import unicodedata
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from engine.config import STRENGTH_MIN, STYLE_NAME, LimitsSection
from engine.errors import N_, InvalidCommand, Phrase
from engine.request import ImageRequest

MAX_ASPECT = 4  # --ar beyond 4:1 (or 1:4) gives slivers the model draws badly
_ALIASES = {"seed": "seed", "steps": "steps", "ar": "ar", "aspect": "ar", "size": "size",
            "guidance": "guidance", "cfg": "guidance", "n": "n", "images": "n",
            "strength": "strength", "style": "style"}
_EXAMPLES = {"seed": "42", "steps": "20", "ar": "16:9", "size": "1024x768", "guidance": "3.5",
             "n": "4", "strength": "0.6", "style": "watercolor"}
_QUOTES = {'"': '"', "'": "'", "“": "”", "„": "“", "«": "»", "‘": "’"}  # opening -> closing
_COMMAND = re.compile(r"/imagine(?:@[A-Za-z0-9_]+)?(?= |$)", re.IGNORECASE)
# What an error calls an option: as the user typed it ("--steps"), or a phrase ("the seed option")
Label = str | Phrase

def _wide(word: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) for c in word)  # "seed" -> "ｓｅｅｄ"


# Option marks typed on Chinese and Japanese keyboards (——seed, －－ｓｅｅｄ): taken only before a
# known option name, also right after Chinese text with no space, so that "東京——Tokyo" and
# "café——latte" stay prompts.
_NAMES = "|".join(sorted({n for name in _ALIASES for n in (name, _wide(name))}, key=len,
                         reverse=True))
_WIDE_MARK = rf"(?:——|－－|－|—)({_NAMES})(?=[ =＝]|$)"  # group 1: the option's name
_AFTER = r"(?:^|(?<= )|(?<=[^\x00-\x7f]))"  # the start, a space, or Chinese text
_WIDE_OPTION = re.compile(_AFTER + _WIDE_MARK, re.IGNORECASE)
_OPTION_START = re.compile(rf"(?:^|(?<= ))(?:--|—|–)[A-Za-z]|{_AFTER}{_WIDE_MARK}",
                           re.IGNORECASE)
_SPACE_OPTION = re.compile(rf" (?:(?:--|—|–)[A-Za-z]|{_WIDE_MARK})", re.IGNORECASE)
_FLAG = re.compile(r"(?:--|—|–)([A-Za-z][^=]*)(?:=(.*))?", re.DOTALL)
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+(?:[.,]\d*)?|[.,]\d+)")
_SIZE = re.compile(r"(\d+) ?[x×*] ?(\d+)", re.IGNORECASE)
_RATIO = re.compile(r"(\d{1,6}(?:\.\d{1,6})?) ?[:/] ?(\d{1,6}(?:\.\d{1,6})?)")

# Cleaning: controls that are whitespace become spaces, other controls, bidi overrides/isolates,
# zero-width characters and lone surrogates go. U+200D (zero-width joiner) is kept only inside
# emoji sequences such as 👩‍🚀, where it is part of the emoji.
_DROP = (list(range(0x00, 0x20)) + list(range(0x7F, 0xA0)) + list(range(0x202A, 0x202F))
         + list(range(0x2066, 0x206A)) + [0x061C, 0x200E, 0x200F]  # direction marks
         + [0x200B, 0x200C, 0x2060, 0xFEFF]
         + list(range(0xD800, 0xE000)))
_CLEAN_TABLE = {c: (" " if chr(c).isspace() else None) for c in _DROP}
_ZWJ = "\u200d"


def clean_prompt(text: str) -> str:
    """Remove control, bidi and zero-width characters and collapse whitespace; keep other text."""
    text = text.translate(_CLEAN_TABLE)
    if _ZWJ in text:
        text = re.sub(_ZWJ, lambda m: _ZWJ if _joins_emoji(m.string, m.start()) else "", text)
    return " ".join(text.split())


def _ascii_option_marks(text: str) -> str:
    """In the options: ``——seed`` and ``－－ｓｅｅｄ`` (what Chinese input methods type for
    ``--seed``) become ``--seed``."""
    def ascii_mark(m: re.Match[str]) -> str:
        space = " " if m.start() and text[m.start() - 1] != " " else ""  # "狐狸——seed"
        return f"{space}--{unicodedata.normalize('NFKC', m.group(1))}"

    return _WIDE_OPTION.sub(ascii_mark, text)


def _joins_emoji(text: str, at: int) -> bool:
    if at == 0 or at + 1 >= len(text):
        return False
    before, after = text[at - 1], text[at + 1]
    emoji_before = (unicodedata.category(before) == "So" or before == "\ufe0f"
                    or 0x1F3FB <= ord(before) <= 0x1F3FF)  # skin-tone modifiers
    return emoji_before and unicodedata.category(after) == "So"


@dataclass(frozen=True)
class ParsedCommand:
    """What the text said; ``None`` means "not given" (``to_request`` fills the defaults)."""

    prompt: str
    seed: int | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    guidance: float | None = None
    count: int | None = None  # --n
    strength: float | None = None  # --strength: image-to-image only (engine/input_image.py)
    style: str | None = None  # --style: a name; whether it is configured is the engine's check

    def merged_with(self, limits: LimitsSection,
                    **options: object) -> tuple[ParsedCommand, list[str]]:
        """Fill fields the text left unset from typed options (e.g. Discord's option fields).

        ``options``: seed, steps, guidance, n, strength, style, aspect ("16:9") or size ("WxH");
        ``None``
        values are
        ignored; all given values are validated with ``limits``. The text wins on conflict; the
        second result names the options whose (different) value the text overrode.
        """
        unknown = set(options) - {"seed", "steps", "guidance", "n", "strength", "style", "aspect",
                                  "size"}
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        given = {k: v for k, v in options.items() if v is not None}
        if "aspect" in given and "size" in given:
            raise _error(N_("Please use either the aspect option or the size option, not both."))
        current = {"seed": self.seed, "steps": self.steps, "guidance": self.guidance,
                   "n": self.count, "strength": self.strength, "style": self.style,
                   "size": None if self.width is None else (self.width, self.height)}
        changes: dict[str, Any] = {}
        overridden = []
        for name, raw in given.items():
            field = {"aspect": "size"}.get(name, name)
            value = _convert(name, raw, Phrase(N_("the {name} option"), name=name), limits)
            if current[field] is None:
                changes[field] = value
            elif current[field] != value:
                overridden.append(name)
        if "size" in changes:
            changes["width"], changes["height"] = changes.pop("size")
        if "n" in changes:
            changes["count"] = changes.pop("n")
        return dataclasses.replace(self, **changes), overridden

    def to_request(self, limits: LimitsSection, rng: random.Random | None = None) -> ImageRequest:
        """Fill defaults; a missing seed is drawn from ``rng`` (default ``random.SystemRandom``)."""
        # Checked again: adapters may build a ParsedCommand by hand, or with other limits.
        prompt = _check_prompt(clean_prompt(self.prompt), limits)
        if self.strength is not None:  # engine/input_image.py takes it out when there is an image
            raise _error(N_("--strength only works with an image to start from; please send "
                            "one with the command, or leave --strength out."))
        size = (self.width or limits.width_default, self.height or limits.height_default)
        count = _whole(limits.images_default if self.count is None else self.count,
                       Phrase(N_("--n (images)")), 1, limits.images_max)
        top = limits.seed_max - (count - 1)  # the last image's seed is seed + count - 1
        seed = self.seed
        if seed is None:
            seed = (rng or random.SystemRandom()).randint(limits.seed_min,
                                                          max(limits.seed_min, top))
        steps = limits.steps_default if self.steps is None else self.steps
        guidance = limits.guidance_default if self.guidance is None else self.guidance
        width, height = _size(f"{size[0]}x{size[1]}", Phrase(N_("the size")), limits)
        return ImageRequest(
            prompt=prompt,
            seed=_whole(seed, Phrase(N_("the seed")) if count == 1 else
                        Phrase(N_("the seed (with --n {count})"), count=count),
                        limits.seed_min, top),
            steps=_whole(steps, Phrase(N_("the steps")), limits.steps_min, limits.steps_max),
            width=width,
            height=height,
            guidance=_number(guidance, Phrase(N_("the guidance")), limits.guidance_min,
                             limits.guidance_max),
            seed_was_random=self.seed is None,
            count=count,
            style=self.style or "",
        )


def parse_command(text: str, limits: LimitsSection) -> ParsedCommand:
    """Parse ``/imagine`` text; raises ``InvalidCommand`` (and nothing else) for bad input."""
    prompt, options_text = _split(clean_prompt(text))
    # option marks, full-width digits, colons and equals signs of Chinese and Japanese input
    # methods, in the options only: the prompt is left as typed
    options_text = unicodedata.normalize("NFKC", _ascii_option_marks(options_text))
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for name, spelling, raw in _read_options(options_text):
        if name in spelled:
            raise _repeated(spelled[name], spelling)
        spelled[name] = spelling
        values[name] = _convert(name, raw, spelling, limits)
    if "ar" in values and "size" in values:
        raise _error(N_("Please use either {option} or --size, not both."), option=spelled["ar"])
    width, height = values.get("ar") or values.get("size") or (None, None)
    return ParsedCommand(
        prompt=_check_prompt(prompt, limits),
        seed=values.get("seed"),
        steps=values.get("steps"),
        width=width, height=height,
        guidance=values.get("guidance"),
        count=values.get("n"),
        strength=values.get("strength"),
        style=values.get("style"),
    )


def parse_imagine(text: str, limits: LimitsSection,
                  rng: random.Random | None = None) -> ImageRequest:
    return parse_command(text, limits).to_request(limits, rng)


def _split(text: str) -> tuple[str, str]:
    """(prompt, options text) of cleaned text, after dropping the /imagine command word."""
    command = _COMMAND.match(text)
    if command:
        text = text[command.end():].lstrip()
    closing = _QUOTES.get(text[:1])
    if closing:
        at = text.find(closing, 1)
        while at != -1:
            if at + 1 == len(text) or _SPACE_OPTION.match(text, at + 1):
                return text[1:at].strip(), text[at + 1:]
            at = text.find(closing, at + 1)
    start = _OPTION_START.search(text)
    if start is None:
        return text, ""
    return text[:start.start()].strip(), text[start.start():]


def _read_options(text: str) -> list[tuple[str, str, str]]:
    """[(canonical name, name as typed with --, raw value)] in order; unknown names are errors."""
    tokens = text.split()
    found = []
    i = 0
    while i < len(tokens):
        flag = _FLAG.fullmatch(tokens[i])
        if flag is None:
            raise _error(N_("{text} comes after the options, where only options such as "
                            "--seed 42 may stand; please write the whole prompt first (or put "
                            "it in quotes)."), text=_shown(tokens[i]))
        spelling = "--" + flag.group(1).lower()
        name = _ALIASES.get(flag.group(1).lower())
        if name is None:
            raise _unknown(flag.group(1).lower())
        if flag.group(2) is not None:
            value, i = flag.group(2), i + 1
        elif i + 1 < len(tokens) and not _FLAG.fullmatch(tokens[i + 1]):
            value, i = tokens[i + 1], i + 2
        else:
            value, i = "", i + 1
        if not value:
            raise _error(N_("{option} needs a value, e.g. {option} {example}."),
                         option=spelling, example=_EXAMPLES[name])
        found.append((name, spelling, value))
    return found


def _unknown(name: str) -> InvalidCommand:
    shown = "--" + (name if len(name) <= 24 else name[:24] + "…")
    close = difflib.get_close_matches(name[:40], list(_ALIASES), n=1, cutoff=0.6)
    if close:
        return _error(N_("Unknown option {option}; did you mean {suggestion}?"), option=shown,
                      suggestion=f"--{close[0]}")
    return _error(N_("Unknown option {option}; the options are --seed, --steps, --ar, --size, "
                     "--guidance, --n, --strength and --style."), option=shown)


def _repeated(first: str, second: str) -> InvalidCommand:
    if first == second:
        return _error(N_("{option} was given twice; please give it only once."), option=first)
    return _error(N_("{first} and {second} are the same option; please give it only once."),
                  first=first, second=second)


def _check_prompt(prompt: str, limits: LimitsSection) -> str:
    if not prompt:
        raise _error(N_("The prompt is empty; please say what to draw, e.g. /imagine a red fox "
                        "in the snow --seed 7."))
    if len(prompt) > limits.max_prompt_chars:  # both counts are large: no singular
        raise _error(N_("The prompt is {length} characters long; please keep it to at most "
                        "{most} characters."), length=f"{len(prompt):,}",
                     most=f"{limits.max_prompt_chars:,}")
    return prompt


def _convert(name: str, value: object, label: Label, limits: LimitsSection) -> Any:
    """One option's value (a typed value or text), checked against ``limits``."""
    if name == "seed":
        return _whole(value, label, limits.seed_min, limits.seed_max)
    if name == "steps":
        return _whole(value, label, limits.steps_min, limits.steps_max)
    if name == "guidance":
        return _number(value, label, limits.guidance_min, limits.guidance_max)
    if name == "n":
        return _whole(value, label, 1, limits.images_max)
    if name == "strength":
        return _number(value, label, STRENGTH_MIN, 1.0)
    if name == "style":
        return _style(value, label)
    if name in ("ar", "aspect"):
        return aspect_to_size(_text(value), limits, label=label)
    return _size(_text(value), label, limits)


def _text(value: object) -> str:
    """Option text without one pair of surrounding quotes (``--ar "16:9"``)."""
    text = str(value).strip().replace("\u2212", "-")  # U+2212 is the typographic minus sign
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def _style(value: object, label: Label) -> str:
    """A style name as configured: lower case, letters, digits, - and _."""
    name = _text(value).lower()
    if not STYLE_NAME.fullmatch(name):
        raise _error(N_("{label} needs the name of a style, e.g. {label} watercolor; /styles "
                        "lists them."), label=label)
    return name


def _error(message: str, **params: object) -> InvalidCommand:
    """The error for ``message``, which may start with a lower-case label ("the seed option")."""
    return InvalidCommand(Phrase(message, **params).as_sentence())


def _shown(text: str) -> str:
    return "“" + (text if len(text) <= 24 else text[:24] + "…") + "”"


# A number's errors, for whole numbers and for any number: whole sentences (the range in each).
_NOT_WHOLE = N_("{label} needs a whole number from {low} to {high}, not {shown}.")
_WHOLE_OUT = N_("{label} must be a whole number from {low} to {high}; {shown} is out of range.")
_HUGE_WHOLE = N_("{label} must be a whole number from {low} to {high}; that number is out of "
                 "range.")
_NOT_NUMBER = N_("{label} needs a number from {low} to {high}, not {shown}.")
_NUMBER_OUT = N_("{label} must be a number from {low} to {high}; {shown} is out of range.")
_HUGE_NUMBER = N_("{label} must be a number from {low} to {high}; that number is out of range.")


def _whole(value: object, label: Label, low: int, high: int) -> int:
    shown: str | None  # None: an integer too long to show ("that number")
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
        shown = str(value) if value.bit_length() < 64 else None
    else:
        text = _text(value)
        if not _INT.fullmatch(text):
            raise _error(_NOT_WHOLE, label=label, low=low, high=high, shown=_shown(text))
        sign, digits = ("-" if text[0] == "-" else ""), text.lstrip("+-").lstrip("0") or "0"
        shown = _shown(text)
        if len(digits) > len(str(high)) + 1:  # a guard before int(): thousands of digits are slow
            raise _error(_WHOLE_OUT, label=label, low=low, high=high, shown=shown)
        number = int(sign + digits)
    if not low <= number <= high:
        if shown is None:
            raise _error(_HUGE_WHOLE, label=label, low=low, high=high)
        raise _error(_WHOLE_OUT, label=label, low=low, high=high, shown=shown)
    return number


def _number(value: object, label: Label, low: float, high: float) -> float:
    bounds = {"label": label, "low": f"{low:g}", "high": f"{high:g}"}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, int) and value.bit_length() > 64:  # float(10**400) would raise
            raise _error(_HUGE_NUMBER, **bounds)
        number, shown = float(value), f"{value:g}"
    else:
        text = _text(value)
        if len(text) > 40 or not _FLOAT.fullmatch(text):  # also refuses nan, inf and 1e5
            raise _error(_NOT_NUMBER, shown=_shown(text), **bounds)
        number, shown = float(text.replace(",", ".")), _shown(text)
    if not math.isfinite(number):
        raise _error(_NOT_NUMBER, shown=shown, **bounds)
    if not low <= number <= high:
        raise _error(_NUMBER_OUT, shown=shown, **bounds)
    return number


def _size(text: str, label: Label, limits: LimitsSection) -> tuple[int, int]:
    match = _SIZE.fullmatch(text)
    if match is None:
        raise _error(N_("{label} needs WIDTHxHEIGHT such as 1024x768, not {shown}."),
                     label=label, shown=_shown(text))
    pixels = f"{limits.max_pixels:,}"
    if max(len(match.group(1)), len(match.group(2))) > 7:  # guard before int()
        raise _error(N_("{label} {size} is far too large; at most {pixels} pixels are allowed."),
                     label=label, size=_shown(text), pixels=pixels)
    width, height = int(match.group(1)), int(match.group(2))
    shown, step, low = f"{width}x{height}", limits.size_multiple, limits.min_side
    if width * height > limits.max_pixels:
        raise _error(N_("{label} {size} is {area} pixels, more than the {pixels} allowed (e.g. "
                        "{default})."), label=label, size=shown, area=f"{width * height:,}",
                     pixels=pixels, default=f"{limits.width_default}x{limits.height_default}")
    if min(width, height) < low:
        raise _error(N_("{label} {size} is too small; each side must be at least {low}."),
                     label=label, size=shown, low=low)
    if width % step or height % step:
        near = [max((side + step // 2) // step * step, low) for side in (width, height)]
        if near[0] * near[1] > limits.max_pixels:
            near = [side // step * step for side in (width, height)]
        raise _error(N_("{label} {size} does not fit: both sides must be multiples of {step} "
                        "(try {near})."), label=label, size=shown, step=step,
                     near=f"{near[0]}x{near[1]}")
    return width, height


def aspect_to_size(aspect: str, limits: LimitsSection, *,
                   label: Label = "--ar") -> tuple[int, int]:
    """The size for an aspect ratio "W:H" (also "W/H"; decimals such as 2.39:1 allowed).

    Rule: take the "full" sizes, those whose sides are multiples of ``size_multiple``, at least
    ``min_side``, whose area is at most width_default × height_default (and max_pixels), and where
    neither side can grow by one multiple without passing that area; pick the one whose aspect is
    closest to W:H (by the ratio of the two ratios), then the larger area. 16:9 -> 1360x768,
    4:3 -> 1184x880, 3:2 -> 1248x832, 1:1 -> 1024x1024; H:W gives the transposed size.
    Ratios beyond 4:1 (or 1:4) are refused.
    """
    text = _text(aspect)
    match = _RATIO.fullmatch(text)
    if match is None:
        if _SIZE.fullmatch(text) and len(text) < 16:  # pixels where a ratio belongs
            raise _error(N_("{label} needs a ratio such as 16:9, not {shown}; for pixels use "
                            "--size {size}."), label=label, shown=_shown(text), size=text)
        raise _error(N_("{label} needs a ratio such as 16:9, not {shown}."), label=label,
                     shown=_shown(text))
    across, down = Fraction(match.group(1)), Fraction(match.group(2))
    if not across or not down:
        raise _error(N_("{label} {shown} has a zero side; use a ratio such as 16:9."),
                     label=label, shown=_shown(text))
    ratio = across / down
    if not Fraction(1, MAX_ASPECT) <= ratio <= MAX_ASPECT:
        raise _error(N_("The aspect ratio {ratio} is too extreme; {label} accepts ratios from "
                        "1:{most} to {most}:1."), ratio=text, label=label, most=MAX_ASPECT)
    best = _closest_full_size(ratio, limits)
    if best is None:
        raise _error(N_("No allowed size has the aspect ratio {ratio}; please try --size."),
                     ratio=text)
    return best


def _closest_full_size(ratio: Fraction, limits: LimitsSection) -> tuple[int, int] | None:
    step = limits.size_multiple
    budget = min(limits.width_default * limits.height_default, limits.max_pixels)
    low = -(-limits.min_side // step) * step  # the smallest allowed side
    candidates = []
    for side in range(low, budget // low + 1, step):
        other = budget // side // step * step  # the longest other side that fits beside side
        if other >= low and (side + step) * other > budget:  # and side cannot grow either
            candidates += [(other, side), (side, other)]
    if not candidates:
        return None

    def distance(size: tuple[int, int]) -> tuple[Fraction, int]:
        have = Fraction(size[0], size[1])
        # max(a/b, b/a) is exact and the same for a size and its transpose (H:W -> transposed).
        return max(have / ratio, ratio / have), -size[0] * size[1]

    return min(candidates, key=distance)


def format_command(command: ParsedCommand | ImageRequest) -> str:
    """The ``/imagine`` text that parses back to ``command`` (quoting the prompt when needed).

    Raises ValueError for the rare prompt that no quote pair can hold (one that contains every
    closing quote followed by an option word).
    """
    count = command.count if command.count != 1 else None
    options = [f"--{name} {value}" for name, value in (
        ("seed", command.seed), ("steps", command.steps), ("guidance", command.guidance),
        ("n", count), ("strength", _strength_of(command)), ("style", command.style or None))
        if value is not None]
    if command.width is not None and command.height is not None:
        options.append(f"--size {command.width}x{command.height}")
    tail = "".join(" " + option for option in options)
    for opening, closing in [("", ""), *_QUOTES.items()]:
        candidate = f"{opening}{command.prompt}{closing}"
        if _split(candidate + tail)[0] == command.prompt:
            return f"/imagine {candidate}{tail}"
    raise ValueError("this prompt cannot be quoted unambiguously")


def _strength_of(command: ParsedCommand | ImageRequest) -> float | None:
    if isinstance(command, ParsedCommand):
        return command.strength
    return command.strength if command.init_image else None


def usage_lines(limits: LimitsSection) -> list[tuple[str, dict[str, object]]]:
    """/help's lines as message ids and their fields: ``bot/render.py`` says them in the
    reader's language."""
    try:
        wide = "{}x{}".format(*aspect_to_size("16:9", limits))
    except InvalidCommand:
        wide = "?"
    return [
        (N_("/imagine <prompt> [options]"), {}),
        (N_("  --seed N      {low}–{high} (random if left out)"),
         {"low": limits.seed_min, "high": limits.seed_max}),
        (N_("  --steps N     {low}–{high} (default {default})"),
         {"low": limits.steps_min, "high": limits.steps_max, "default": limits.steps_default}),
        (N_("  --ar W:H      aspect ratio from 1:{most} to {most}:1 (16:9 gives {wide})"),
         {"most": MAX_ASPECT, "wide": wide}),
        (N_("  --size WxH    sides multiples of {multiple}, at least {low}, at most {pixels} "
            "pixels (default {width}x{height})"),
         {"multiple": limits.size_multiple, "low": limits.min_side,
          "pixels": f"{limits.max_pixels:,}", "width": limits.width_default,
          "height": limits.height_default}),
        (N_("  --guidance X  {low}–{high} (default {default})"),
         {"low": f"{limits.guidance_min:g}", "high": f"{limits.guidance_max:g}",
          "default": f"{limits.guidance_default:g}"}),
        (N_("  --n N         images at once, 1–{most} (default {default}; their seeds follow "
            "on: 7, 8, 9, …)"), {"most": limits.images_max, "default": limits.images_default}),
        (N_("  --strength X  {low}–1 with a picture sent along to start from (default "
            "{default}; lower keeps more of the picture)"),
         {"low": f"{STRENGTH_MIN:g}", "default": f"{limits.strength_default:g}"}),
        (N_("  --style NAME  a style (LoRA) of this bot's; /styles lists them"), {}),
        (N_("Prompts: at most {most} characters; quote them if they contain --."),
         {"most": f"{limits.max_prompt_chars:,}"}),
        (N_("Example: /imagine a red fox in the snow --seed 7 --ar 16:9"), {}),
    ]


def usage(limits: LimitsSection) -> str:
    """A short /help text built from ``limits`` (English)."""
    return "\n".join(line.format(**fields) for line, fields in usage_lines(limits))


HELP_TEXT = usage(LimitsSection())
