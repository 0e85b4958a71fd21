"""``python -m bot.i18n``: compile the catalogues (``.po`` -> ``.mo``) for a build;
``python -m bot.i18n missing``: the message ids a catalogue has no words for yet."""

import sys

from bot.i18n.catalog import FOLDERS, compile_all, po_path


def _missing() -> int:
    from babel.messages.pofile import read_po

    from bot.i18n.extract import used_catalog

    used = [m.id for m in used_catalog() if m.id]
    gaps = 0
    for language in FOLDERS:
        with po_path(language).open("rb") as f:
            have = read_po(f)
        for msgid in used:
            entry = have.get(msgid)
            if entry is None or not entry.string or (isinstance(entry.string, tuple)
                                                     and not all(entry.string)):
                print(f"{language}: {msgid!r}")
                gaps += 1
    return 1 if gaps else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["missing"]:
        sys.exit(_missing())
    for path in compile_all():
        print(f"wrote {path}")
