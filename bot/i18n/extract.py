"""The message ids the code uses (``_``, ``N_``, ``ngettext``, ``N_plural``, ``lstr`` in ``bot/``
and ``engine/``), read with Babel's extractor: the catalogue test checks that each has its words in
every language, and a maintainer lists the new ones with ``python -m bot.i18n missing``."""

from __future__ import annotations

from pathlib import Path

from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("bot", "engine")
KEYWORDS = {"_": None, "N_": None, "ngettext": (1, 2), "N_plural": (1, 2), "lstr": None}


def used_catalog() -> Catalog:
    """Every message id in the sources, with where it is used."""
    catalog = Catalog(project="imagine-bot")
    for folder in SOURCES:
        found = extract_from_dir(ROOT / folder, method_map=[("**.py", "python")],
                                 keywords=KEYWORDS, comment_tags=("i18n:",))
        for filename, lineno, message, comments, context in found:
            catalog.add(message, None, [(f"{folder}/{filename}", lineno)],
                        auto_comments=comments, context=context)
    return catalog
