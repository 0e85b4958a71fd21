"""The /imagine grammar, feature by feature: what parses, what each mistake is told."""

from __future__ import annotations

import dataclasses
import random
from fractions import Fraction

import pytest

from engine.config import LimitsSection
from engine.errors import InvalidCommand
from engine.grammar import (
    HELP_TEXT,
    ParsedCommand,
    aspect_to_size,
    clean_prompt,
    format_command,
    parse_command,
    parse_imagine,
    usage,
)
from engine.request import ImageRequest

LIMITS = LimitsSection()


def parse(text: str, limits: LimitsSection = LIMITS) -> ParsedCommand:
    return parse_command(text, limits)


def refused(text: str, limits: LimitsSection = LIMITS) -> str:
    """The message for text that must be refused; it must be one polite sentence."""
    with pytest.raises(InvalidCommand) as caught:
        parse_command(text, limits)
    message = str(caught.value)
    assert not message[:1].islower() and message[-1] in ".?" and "\n" not in message, message
    assert len(message) < 200, message
    return message


# --- what parses ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "a red fox --seed 5 --steps 7",
    "/imagine a red fox --seed 5 --steps 7",
    "/IMAGINE a red fox --steps 7 --seed 5",
    "/Imagine@My_Bot42 a red fox --seed=5 --steps=7",
    "a red fox —seed 5 –steps 7",
    "a red fox --SEED 5 --Steps 7",
    "  a   red\tfox\n--seed 5\n--steps 7  ",
    '"a red fox" --seed 5 --steps 7',
    "“a red fox” --steps=7 —seed 5",
    "/imagine «a red fox» --seed 5 --steps 7",
    "'a red fox' --seed 5 --steps 7",
])
def test_the_same_command_in_many_spellings(text: str) -> None:
    assert parse(text) == ParsedCommand("a red fox", seed=5, steps=7)


def test_a_prompt_alone_leaves_everything_else_unset() -> None:
    assert parse("a lighthouse at dusk") == ParsedCommand("a lighthouse at dusk")


def test_the_command_word_must_stand_alone() -> None:
    assert parse("/imaginefoo bar").prompt == "/imaginefoo bar"
    assert parse("/imagine /imagine bar").prompt == "/imagine bar"  # only one is dropped


def test_all_options_with_aliases() -> None:
    got = parse("a fox --aspect 16:9 --cfg 4.5 --seed 0 --steps 50")
    assert got == ParsedCommand("a fox", seed=0, steps=50, width=1360, height=768, guidance=4.5)
    assert parse("a fox --guidance 3,5").guidance == 3.5  # a decimal comma, as phones type it


@pytest.mark.parametrize("size", ["768x1024", "768X1024", "768×1024", "768*1024"])
def test_size_spellings(size: str) -> None:
    got = parse(f"a fox --size {size}")
    assert (got.width, got.height) == (768, 1024)


def test_quoted_prompt_may_contain_option_words() -> None:
    assert parse('"a sign that says --seed" --steps 4') == ParsedCommand(
        "a sign that says --seed", steps=4)
    assert parse('"a sign saying "hi"" --seed 1').prompt == 'a sign saying "hi"'


def test_quotes_that_do_not_wrap_the_prompt_are_plain_text() -> None:
    assert parse('"Hello" said the fox --steps 3') == ParsedCommand('"Hello" said the fox', steps=3)
    assert parse("it's the fox's den --seed 2").prompt == "it's the fox's den"


@pytest.mark.parametrize("text", ['"a red fox --seed 5', 'a red fox" --seed 5', '"“« --seed 5'])
def test_unbalanced_quotes_stay_in_the_prompt(text: str) -> None:
    got = parse(text)
    assert got.seed == 5 and got.prompt == text.rsplit(" --", 1)[0]


def test_quoted_option_values_are_unwrapped() -> None:
    got = parse('a fox --ar "16:9" --seed "12"')
    assert (got.width, got.height, got.seed) == (1360, 768, 12)


def test_hyphens_and_dashes_inside_the_prompt_are_text() -> None:
    text = "a well-known fox -- very cute — and tired, 5-10 years old"
    assert parse(f"{text} --seed 1") == ParsedCommand(text, seed=1)


# --- prompt cleaning -----------------------------------------------------------------------

def test_cleaning_removes_controls_bidi_and_zero_width() -> None:
    assert clean_prompt("a\u202eb\u2066c\u2069d\u200be\u200cf\u2060g\ufeffh\x00i\x7fj\x9bk") == (
        "abcdefghijk")
    assert clean_prompt("line one\nline two\r\n\ttabbed\x0bv\x85nel") == (
        "line one line two tabbed v nel")
    assert clean_prompt("  lots \u00a0 of\u3000space  ") == "lots of space"


def test_cleaning_keeps_emoji_and_all_scripts() -> None:
    text = "🦊 狐狸 лиса ثعلب 👩\u200d🚀 👍🏽 🏳️\u200d🌈 café ñ"
    assert clean_prompt(text) == text


def test_zero_width_joiner_goes_outside_emoji() -> None:
    assert clean_prompt("ba\u200dnned \u200d🦊 🦊\u200d") == "banned 🦊 🦊"


def test_cleaning_applies_before_parsing_and_length() -> None:
    hidden = "\u200b" * 500
    got = parse("x" * LIMITS.max_prompt_chars + hidden + " --se\u200bed 3")
    assert len(got.prompt) == LIMITS.max_prompt_chars and got.seed == 3


# --- the mistakes, and what the user is told -----------------------------------------------

@pytest.mark.parametrize(("flag", "suggestion"), [
    ("--sed", "--seed"), ("--step", "--steps"), ("--sise", "--size"), ("--guidence", "--guidance"),
    ("—aspetc", "--aspect"), ("--seed5", "--seed"),
])
def test_unknown_option_names_the_closest(flag: str, suggestion: str) -> None:
    message = refused(f"a fox {flag} 5")
    assert "Unknown option" in message and f"did you mean {suggestion}?" in message


def test_unknown_option_far_from_all_lists_them() -> None:
    message = refused("a fox --banana 5")
    assert "--banana" in message
    assert all(name in message for name in ("--seed", "--steps", "--ar", "--size", "--guidance"))


@pytest.mark.parametrize(("text", "expected"), [
    ("a fox --steps 51", "--steps must be a whole number from 1 to 50; “51” is out of range."),
    ("a fox --steps 0", "from 1 to 50"),
    ("a fox --seed 4294967296", "from 0 to 4294967295"),
    ("a fox --guidance 10.5", "--guidance must be a number from 1 to 10; “10.5” is out of range."),
    ("a fox --cfg 0.5", "--cfg must be a number from 1 to 10"),
])
def test_out_of_range_says_the_range(text: str, expected: str) -> None:
    assert expected in refused(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("a fox --steps many", "--steps needs a whole number from 1 to 50, not “many”."),
    ("a fox --steps 1e9", "--steps needs a whole number from 1 to 50, not “1e9”."),
    ("a fox --steps 2.5", "not “2.5”"),
    ("a fox --seed 0x10", "--seed needs a whole number"),
    ("a fox --guidance lots", "--guidance needs a number from 1 to 10, not “lots”."),
    ("a fox --size big", "--size needs WIDTHxHEIGHT such as 1024x768, not “big”."),
    ("a fox --ar wide", "--ar needs a ratio such as 16:9, not “wide”."),
    ("a fox --ar 1024x768", "for pixels use --size 1024x768"),
])
def test_non_numeric_values(text: str, expected: str) -> None:
    assert expected in refused(text)


@pytest.mark.parametrize("text", ["a fox --seed", "a fox --seed --steps 4", "a fox --seed="])
def test_missing_value(text: str) -> None:
    assert refused(text) == "--seed needs a value, e.g. --seed 42."


@pytest.mark.parametrize("text", [
    "", "   ", "/imagine", "/imagine@Bot ", "/imagine --seed 5", '""', "“ ” --steps 3",
    "\u200b\u202e\n\t\x00", "/imagine \u2066\u2069",
])
def test_empty_prompt(text: str) -> None:
    assert refused(text).startswith("The prompt is empty")


def test_prompt_too_long_says_limit_and_length() -> None:
    message = refused("y" * 1001)
    assert "1,001 characters" in message and "at most 1,000" in message
    small = dataclasses.replace(LIMITS, max_prompt_chars=10)
    assert parse("0123456789", small).prompt == "0123456789"
    assert "11 characters" in refused("0123456789a --seed 1", small)


@pytest.mark.parametrize(("text", "expected"), [
    ("a fox --seed 1 --seed 2", "--seed was given twice; please give it only once."),
    ("a fox --seed 1 --steps 3 —seed=1", "--seed was given twice"),
    ("a fox --ar 1:1 --aspect 1:1", "--ar and --aspect are the same option"),
    ("a fox --cfg 4 --guidance 4", "--cfg and --guidance are the same option"),
])
def test_repeated_option_is_refused(text: str, expected: str) -> None:
    assert expected in refused(text)


@pytest.mark.parametrize(("text", "stray"), [
    ("a fox --seed 5 and a hen", "“and”"), ("--seed 5 a fox", "“a”"),
    ('"a fox" --seed 5 "cute"', '“"cute"”'),
])
def test_text_after_the_options(text: str, stray: str) -> None:
    message = refused(text)
    assert message.startswith(stray) and "comes after the options" in message
    assert "prompt first" in message


def test_ar_and_size_together() -> None:
    assert refused("a fox --ar 16:9 --size 1024x1024") == (
        "Please use either --ar or --size, not both.")
    assert "--aspect or --size" in refused("a fox --size 512x512 --aspect 1:1")


# --- sizes ---------------------------------------------------------------------------------

def test_size_errors_say_what_is_allowed() -> None:
    assert "multiples of 16 (try 1008x1008)" in refused("a fox --size 1000x1000")
    assert "at least 256" in refused("a fox --size 240x512")
    message = refused("a fox --size 2048x2048")
    assert "4,194,304 pixels" in message and "1,048,576" in message


def test_sizes_within_custom_limits() -> None:
    limits = dataclasses.replace(LIMITS, size_multiple=64, min_side=512, max_pixels=2**21)
    assert "multiples of 64" in refused("a fox --size 1040x1040", limits)
    assert "at least 512" in refused("a fox --size 448x1024", limits)
    got = parse("a fox --size 2048x1024", limits)
    assert (got.width, got.height) == (2048, 1024)


@pytest.mark.parametrize(("ratio", "size"), [
    ("16:9", (1360, 768)), ("9:16", (768, 1360)), ("1:1", (1024, 1024)), ("4:1", (2048, 512)),
    ("1:4", (512, 2048)), ("3:2", (1248, 832)), ("16/9", (1360, 768)), ("32:18", (1360, 768)),
])
def test_aspect_examples(ratio: str, size: tuple[int, int]) -> None:
    assert aspect_to_size(ratio, LIMITS) == size


def _full_sizes(limits: LimitsSection) -> list[tuple[int, int]]:
    """Every allowed size that cannot grow by one step on either side (brute force)."""
    step, budget = limits.size_multiple, limits.width_default * limits.height_default
    sides = range(limits.min_side, budget // limits.min_side + 1, step)
    return [(w, h) for w in sides for h in sides if w * h <= budget
            and (w + step) * h > budget and w * (h + step) > budget]


@pytest.mark.parametrize("ratio", ["16:9", "4:3", "5:4", "7:3", "2.39:1", "1:3", "13:17", "4:1"])
def test_aspect_rule_against_brute_force(ratio: str) -> None:
    wanted = Fraction(*(Fraction(part) for part in ratio.split(":")))
    full = _full_sizes(LIMITS)

    def badness(size: tuple[int, int]) -> tuple[Fraction, int]:
        have = Fraction(*size)
        return max(have / wanted, wanted / have), -size[0] * size[1]

    best = min(full, key=badness)
    got = aspect_to_size(ratio, LIMITS)
    assert got == best
    assert got[0] % 16 == 0 and got[1] % 16 == 0 and got[0] * got[1] <= 1024 * 1024
    assert got[1::-1] == aspect_to_size(f"{wanted.denominator}:{wanted.numerator}", LIMITS)


@pytest.mark.parametrize("ratio", ["5:1", "1:5", "17:4", "100:1"])
def test_extreme_aspect_is_refused(ratio: str) -> None:
    message = refused(f"a fox --ar {ratio}")
    assert "too extreme" in message and "from 1:4 to 4:1" in message


def test_zero_aspect_side() -> None:
    assert "zero side" in refused("a fox --ar 0:9")


# --- requests, merging, help ---------------------------------------------------------------

def test_to_request_fills_defaults_and_draws_the_seed_from_rng() -> None:
    request = parse("a fox").to_request(LIMITS, random.Random(7))
    expected_seed = random.Random(7).randint(LIMITS.seed_min, LIMITS.seed_max)
    assert request == ImageRequest("a fox", expected_seed, 20, 1024, 1024, 3.5,
                                   seed_was_random=True)


def test_to_request_keeps_given_values() -> None:
    request = parse_imagine("a fox --seed 9 --steps 4 --ar 9:16 --guidance 2", LIMITS)
    assert request == ImageRequest("a fox", 9, 4, 768, 1360, 2.0, seed_was_random=False)


def test_to_request_without_rng_uses_system_randomness() -> None:
    seeds = {parse("a fox").to_request(LIMITS).seed for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= seed <= LIMITS.seed_max for seed in seeds)


def test_to_request_checks_a_hand_built_command() -> None:
    with pytest.raises(InvalidCommand, match="from 1 to 50"):
        ParsedCommand("a fox", steps=99).to_request(LIMITS)
    with pytest.raises(InvalidCommand, match="empty"):
        ParsedCommand(" \u200b ").to_request(LIMITS)
    strict = dataclasses.replace(LIMITS, steps_max=8, steps_default=8)
    with pytest.raises(InvalidCommand, match="from 1 to 8"):
        parse("a fox --steps 20").to_request(strict)


def test_merged_with_fills_what_the_text_left_unset() -> None:
    merged, overridden = parse("a fox --seed 4").merged_with(
        LIMITS, seed=5, steps="12", aspect="16:9", guidance=None)
    assert merged == ParsedCommand("a fox", seed=4, steps=12, width=1360, height=768)
    assert overridden == ["seed"]


def test_merged_with_reports_only_real_conflicts() -> None:
    text = parse("a fox --seed 4 --size 512x512 --guidance 2")
    merged, overridden = text.merged_with(LIMITS, seed=4, size="512x512", guidance=3)
    assert merged == text and overridden == ["guidance"]
    assert text.merged_with(LIMITS, aspect="1:1")[1] == ["aspect"]


def test_merged_with_validates_options() -> None:
    command = parse("a fox")
    with pytest.raises(InvalidCommand, match=r"^The seed option must be .* from 0 to 4294967295"):
        command.merged_with(LIMITS, seed=-1)
    with pytest.raises(InvalidCommand, match="from 1:4 to 4:1"):
        command.merged_with(LIMITS, aspect="9:1")
    with pytest.raises(InvalidCommand, match="either the aspect option or the size option"):
        command.merged_with(LIMITS, aspect="1:1", size="512x512")
    with pytest.raises(InvalidCommand, match="needs a number"):
        command.merged_with(LIMITS, guidance=float("nan"))
    with pytest.raises(TypeError):
        command.merged_with(LIMITS, sed=5)


def test_usage_is_built_from_the_limits() -> None:
    assert HELP_TEXT == usage(LIMITS)
    assert "1–50 (default 20)" in HELP_TEXT and "1360x768" in HELP_TEXT
    custom = usage(dataclasses.replace(LIMITS, steps_max=8, steps_default=4, max_prompt_chars=300))
    assert "1–8 (default 4)" in custom and "at most 300 characters" in custom


@pytest.mark.parametrize("prompt", [
    "a red fox", "a sign saying --seed 5", '"quoted" fox', "“curly”", '"', "/imagine twice",
    'ends with a quote" --seed', "—steps at the start",
])
def test_format_command_round_trips(prompt: str) -> None:
    command = ParsedCommand(prompt, seed=3, steps=9, width=512, height=768, guidance=2.5)
    assert parse(format_command(command)) == command
    assert parse(format_command(ParsedCommand(prompt))) == ParsedCommand(prompt)


@pytest.mark.parametrize(("text", "prompt", "seed", "steps", "size"), [
    ("/imagine 雪中的红狐狸 ——seed 7", "雪中的红狐狸", 7, None, None),
    ("雪中的红狐狸——seed 7", "雪中的红狐狸", 7, None, None),  # no space after Chinese text
    ("雪中的红狐狸，黎明 ——seed ７ ——steps １２ ——ar １６：９", "雪中的红狐狸，黎明", 7, 12,
     (1360, 768)),
    ("狐狸 －－ｓｅｅｄ ３　——size １０２４×５１２", "狐狸", 3, None, (1024, 512)),
    ("一只猫——在雪中", "一只猫——在雪中", None, None, None),  # the prompt's own dashes
    ("a well--known fox", "a well--known fox", None, None, None),
    # only known option names after a wide mark: these stay prompts, as they always were
    ("東京——Tokyo at night", "東京——Tokyo at night", None, None, None),
    ("café——latte art", "café——latte art", None, None, None),
    ("狐狸 －ｂｉｇ fox", "狐狸 －ｂｉｇ fox", None, None, None),
    ("狐狸——seedling", "狐狸——seedling", None, None, None),
    ('"一只猫——Hello Kitty" --seed 3', "一只猫——Hello Kitty", 3, None, None),  # quoted: as typed
])
def test_full_width_input_method_punctuation(text, prompt, seed, steps, size):
    """Issue 15: Chinese input methods type ——, －－, full-width digits and ：."""
    parsed = parse_command(text, LimitsSection())
    assert (parsed.prompt, parsed.seed, parsed.steps) == (prompt, seed, steps)
    assert (None if parsed.width is None else (parsed.width, parsed.height)) == size
