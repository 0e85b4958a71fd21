"""Hostile input and properties: any text gives a valid command or one InvalidCommand."""

from __future__ import annotations

import math
import unicodedata
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from engine.config import LimitsSection, config_from_dict
from engine.errors import InvalidCommand
from engine.grammar import (
    ParsedCommand,
    aspect_to_size,
    clean_prompt,
    format_command,
    parse_command,
)

LIMITS = LimitsSection()
# A second, tighter set of limits that the config loader accepts.
TIGHT = config_from_dict({"limits": {
    "steps_max": 8, "steps_default": 4, "seed_max": 999, "max_prompt_chars": 40,
    "size_multiple": 64, "min_side": 512, "max_pixels": 2**21, "guidance_min": 1.5,
    "guidance_max": 5.0, "guidance_default": 3.0}}).limits
BIDI = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A))
ZERO_WIDTH = {0x200B, 0x200C, 0x2060, 0xFEFF}
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_valid(command: ParsedCommand, limits: LimitsSection) -> None:
    """Everything parse_command promises about a command it returns."""
    prompt = command.prompt
    assert 0 < len(prompt) <= limits.max_prompt_chars
    assert prompt == " ".join(prompt.split())  # whitespace collapsed, no edges
    for at, char in enumerate(prompt):
        code = ord(char)
        assert unicodedata.category(char) not in ("Cc", "Cs"), repr(prompt)
        assert code not in BIDI and code not in ZERO_WIDTH, repr(prompt)
        if char == "\u200d":  # a zero-width joiner survives only between emoji
            assert 0 < at < len(prompt) - 1 and unicodedata.category(prompt[at + 1]) == "So"
    if command.seed is not None:
        assert limits.seed_min <= command.seed <= limits.seed_max
    if command.steps is not None:
        assert limits.steps_min <= command.steps <= limits.steps_max
    if command.guidance is not None:
        assert math.isfinite(command.guidance)
        assert limits.guidance_min <= command.guidance <= limits.guidance_max
    assert (command.width is None) == (command.height is None)
    if command.width is not None and command.height is not None:
        assert command.width % limits.size_multiple == 0
        assert command.height % limits.size_multiple == 0
        assert min(command.width, command.height) >= limits.min_side
        assert command.width * command.height <= limits.max_pixels


def parse_or_refuse(text: str, limits: LimitsSection) -> str | None:
    """None when text parsed into a valid command, else the (one-sentence) refusal."""
    try:
        command = parse_command(text, limits)
    except InvalidCommand as err:
        message = str(err)
        assert message and "\n" not in message and len(message) < 220, message
        return message
    assert_valid(command, limits)
    request = command.to_request(limits)
    assert request.seed_was_random == (command.seed is None)
    return None


# --- named hostile inputs ------------------------------------------------------------------

HUGE = "9" * 5000


@pytest.mark.parametrize(("text", "expected"), [
    ("a fox --steps 1e9", "--steps needs a whole number from 1 to 50"),
    ("a fox --seed -1", "from 0 to 4294967295; “-1” is out of range"),
    ("a fox --seed −5", "“-5” is out of range"),  # U+2212 minus sign
    ("a fox --size 99999x99999", "9,999,800,001 pixels"),
    (f"a fox --size {HUGE}x{HUGE}", "far too large"),
    (f"a fox --seed {HUGE}", "is out of range"),
    (f"a fox --seed -{HUGE}", "is out of range"),
    (f"a fox --steps {'1' * 100_000}", "is out of range"),
    (f"a fox --guidance {HUGE}", "--guidance needs a number from 1 to 10"),
    (f"a fox --guidance 0.{HUGE}", "--guidance needs a number"),
    (f"a fox --ar {HUGE}:1", "--ar needs a ratio such as 16:9"),
    ("a fox --ar 999999:1", "too extreme"),
    ("a fox --guidance nan", "not “nan”"),
    ("a fox --guidance NaN", "not “NaN”"),
    ("a fox --guidance inf", "not “inf”"),
    ("a fox --guidance -Infinity", "not “-Infinity”"),
    ("a fox --guidance 1e308", "not “1e308”"),
    ("x" * 10_000, "The prompt is 10,000 characters long"),
    ("🦊" * 1001 + " --seed 1", "1,001 characters"),
    ("a fox " + "--seed 1 " * 10_000, "--seed was given twice"),
    ("a fox --" + "z" * 100_000, "Unknown option --zzzzzzzzzzzzzzzzzzzzzzzz…"),
    ("a fox --seed " + "8" * 200 + "x", "--seed needs a whole number"),
    ("\u202e\u2066\u200b\ufeff", "The prompt is empty"),
    ("\x00" * 50_000, "The prompt is empty"),
    ("a fox --steps 5 " + '"' * 50_000, "comes after the options"),
])
def test_hostile_inputs_get_a_clear_answer(text: str, expected: str) -> None:
    message = parse_or_refuse(text, LIMITS)
    assert message is not None and expected in message


@pytest.mark.parametrize("text", [
    '"' * 100_000,
    '"' + " " * 100_000 + '"',
    ('" ' * 50_000) + "--seed 1",
    "— " * 50_000 + "x",
    "--a " * 1 + "a" * 10,
    "a fox --seed ٥",  # Arabic-Indic five
    "a fox --seed ５ --steps ３",  # full-width digits
    "\ud800 a lone surrogate \udfff --seed 3",
    "/imagine@" + "B" * 10_000 + " a fox",
    "/imagine " + "\u200d" * 10_000 + "🦊",
])
def test_hostile_inputs_parse_or_refuse_cleanly(text: str) -> None:
    parse_or_refuse(text, LIMITS)


def test_digits_from_other_scripts_are_numbers() -> None:
    assert parse_command("a fox --seed ٥ --steps ３", LIMITS) == ParsedCommand(
        "a fox", seed=5, steps=3)


def test_many_leading_zeros_are_still_a_number() -> None:
    assert parse_command("a fox --seed " + "0" * 50_000 + "7", LIMITS).seed == 7


def test_lone_surrogates_are_removed() -> None:
    assert parse_command("\ud800fox\udfff", LIMITS).prompt == "fox"


def test_echoed_values_are_shortened() -> None:
    message = parse_or_refuse("a fox --size " + "z" * 10_000, LIMITS)
    assert message is not None and len(message) < 120


# --- properties ----------------------------------------------------------------------------

FRAGMENTS = [
    "/imagine", "/IMAGINE@Bot", "--seed", "—steps", "–ar", "--size", "--guidance", "--cfg",
    "--aspect", "--sed", "--", "—", "=", " ", "  ", '"', "'", "“", "”", "«", "»", ":", "x", "×",
    "*", "-", "+", ".", ",", "0", "1", "16", "9", "256", "1024", "1e9", "nan", "inf", "\n", "\t",
    "\x00", "\x85", "\u202e", "\u2067", "\u200b", "\u200d", "\ufeff", "🦊", "👩", "🚀", "狐", "ث",
    "a red fox", "5" * 40, "7" * 4400,
]
any_text = st.text() | st.text(st.characters(exclude_categories=()), max_size=50)
fragment_text = st.lists(
    st.sampled_from(FRAGMENTS) | st.integers().map(str) | st.text(max_size=3), max_size=25,
).map("".join)
both_limits = st.sampled_from([LIMITS, TIGHT])


@PROPERTY
@given(text=any_text | fragment_text, limits=both_limits)
def test_any_text_parses_to_a_valid_command_or_one_invalid_command(
        text: str, limits: LimitsSection) -> None:
    parse_or_refuse(text, limits)


@st.composite
def commands(draw: st.DrawFn, limits: LimitsSection) -> ParsedCommand:
    """A valid command; fields may be left unset."""
    prompt = draw(st.text(min_size=1, max_size=80) | fragment_text).strip()
    prompt = clean_prompt(prompt)[: limits.max_prompt_chars].strip()
    assume(prompt)
    step, low = limits.size_multiple, limits.min_side
    width = draw(st.integers(low // step, limits.max_pixels // low // step)) * step
    height = draw(st.integers(low // step, limits.max_pixels // width // step)) * step
    maybe = st.booleans()
    sized = draw(maybe)
    return ParsedCommand(
        prompt=prompt,
        seed=draw(st.integers(limits.seed_min, limits.seed_max)) if draw(maybe) else None,
        steps=draw(st.integers(limits.steps_min, limits.steps_max)) if draw(maybe) else None,
        width=width if sized else None,
        height=height if sized else None,
        guidance=draw(st.floats(limits.guidance_min, limits.guidance_max)) if draw(maybe) else None,
    )


@PROPERTY
@given(data=st.data(), limits=both_limits)
def test_formatted_commands_parse_back_to_the_same_values(
        data: st.DataObject, limits: LimitsSection) -> None:
    command = data.draw(commands(limits))
    closers = {'"', "'", "”", "“", "»", "’"}
    if closers <= set(command.prompt):  # documented: such a prompt may be impossible to quote
        assume(False)
    assert parse_command(format_command(command), limits) == command


def test_format_command_refuses_a_prompt_no_quote_can_hold() -> None:
    prompt = "x" + "".join(f"{close} --seed" for close in ['"', "'", "”", "“", "»", "’"])
    with pytest.raises(ValueError):
        format_command(ParsedCommand(prompt))


@PROPERTY
@given(across=st.integers(1, 400), down=st.integers(1, 400), limits=both_limits)
def test_every_allowed_aspect_gives_a_valid_size_and_its_transpose(
        across: int, down: int, limits: LimitsSection) -> None:
    ratio = Fraction(across, down)
    if not Fraction(1, 4) <= ratio <= 4:
        with pytest.raises(InvalidCommand, match="from 1:4 to 4:1"):
            aspect_to_size(f"{across}:{down}", limits)
        return
    width, height = aspect_to_size(f"{across}:{down}", limits)
    step, budget = limits.size_multiple, limits.width_default * limits.height_default
    assert width % step == 0 and height % step == 0 and min(width, height) >= limits.min_side
    assert width * height <= budget
    assert (width + step) * height > budget and width * (height + step) > budget  # full size
    assert aspect_to_size(f"{down}:{across}", limits) == (height, width)


@PROPERTY
@given(seed=st.none() | st.integers() | st.text(max_size=30),
       steps=st.none() | st.integers(-5, 100) | st.sampled_from(["20", "x", "1e9"]),
       aspect=st.none() | st.sampled_from(["16:9", "9:1", "x", "1:1", ""]),
       guidance=st.none() | st.floats(allow_nan=True) | st.text(max_size=6))
def test_typed_options_merge_into_a_valid_command_or_are_refused(
        seed: object, steps: object, aspect: object, guidance: object) -> None:
    base = parse_command("a fox --steps 3", LIMITS)
    try:
        merged, overridden = base.merged_with(
            LIMITS, seed=seed, steps=steps, aspect=aspect, guidance=guidance)
    except InvalidCommand:
        return
    assert_valid(merged, LIMITS)
    assert merged.steps == 3 and overridden == ([] if steps in (None, 3, "3") else ["steps"])
