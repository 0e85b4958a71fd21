"""Where the compiled catalogues come from.

The ``.po`` files are the source (in git). A ``.mo`` next to one is used when it is at least as
new (``python -m bot.i18n`` writes them: the Docker build and packagers run it); otherwise, as in
a fresh clone, CI or an editable install, the ``.po`` is compiled in memory with Babel's own
compiler at first use, so a stale or missing ``.mo`` never shows old words.
"""

from __future__ import annotations

import gettext
import io
from pathlib import Path

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

LOCALE_DIR = Path(__file__).parent / "locale"
DOMAIN = "bot"
# our language codes -> the catalogue folders (Babel's locale names)
FOLDERS = {"en": "en", "zh": "zh_Hans"}


def po_path(language: str) -> Path:
    return LOCALE_DIR / FOLDERS[language] / "LC_MESSAGES" / f"{DOMAIN}.po"


def mo_path(language: str) -> Path:
    return po_path(language).with_suffix(".mo")


def compile_po(po: Path) -> bytes:
    """The ``.mo`` bytes of a ``.po`` file (fuzzy entries left out, as ``pybabel compile``)."""
    with po.open("rb") as f:
        catalog = read_po(f)
    out = io.BytesIO()
    write_mo(out, catalog)
    return out.getvalue()


def load(language: str) -> gettext.NullTranslations:
    po, mo = po_path(language), mo_path(language)
    if mo.exists() and mo.stat().st_mtime >= po.stat().st_mtime:
        data = mo.read_bytes()
    else:
        data = compile_po(po)
    return gettext.GNUTranslations(io.BytesIO(data))


def compile_all() -> list[Path]:
    """Write every ``.mo`` next to its ``.po`` (the build step)."""
    written = []
    for language in FOLDERS:
        mo = mo_path(language)
        mo.write_bytes(compile_po(po_path(language)))
        written.append(mo)
    return written
