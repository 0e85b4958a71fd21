"""LoRA styles from ``[styles.<name>]``: which may be used, where their files are, what a PNG says.

Pure Python (no torch): the engine checks ``--style`` at submit time (``check_style``), so an
unknown style is refused before anything is queued; the FLUX backend finds the files
(``ensure_style_files``) and applies them (``engine/flux/lora.py``); ``png.py`` records the
style as other Stable Diffusion tools write a LoRA (``<lora:name:alpha>``, ``Lora hashes``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from engine.config import ModelSection, StyleSection
from engine.errors import N_, InvalidCommand

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraTag:
    """A style as the PNG parameters record it."""

    name: str
    alpha: float
    hash: str = ""  # AUTOMATIC1111's short hash of the file; "" when the file is not here

    @property
    def prompt_tag(self) -> str:
        return f"<lora:{self.name}:{self.alpha:g}>"


def check_style(name: str, styles: dict[str, StyleSection]) -> None:
    """Raise ``InvalidCommand`` (naming the styles there are) unless ``name`` is "" or one."""
    if not name or name in styles:
        return
    if not styles:
        raise InvalidCommand(N_("There is no style {name}: this bot has no styles set up; "
                                "please leave --style out."), name=_shown(name))
    raise InvalidCommand(N_("There is no style {name}; the styles are: {styles} (/styles "
                            "describes them)."), name=_shown(name),
                         styles=", ".join(sorted(styles)))


def _shown(name: str) -> str:
    return repr(name if len(name) <= 32 else name[:32] + "…")


def prompt_for_model(prompt: str, style: StyleSection | None) -> str:
    """The prompt the model sees: the style's trigger words first."""
    if style is None or not style.trigger.strip():
        return prompt
    return f"{style.trigger.strip()}, {prompt}"


def style_path(style: StyleSection, models_dir: str) -> Path:
    """Where the style's file is: a local path, or ``models_dir/<model_id>/<file>``."""
    if style.model_id:
        return Path(models_dir) / style.model_id / style.file
    return Path(style.file).expanduser()


def ensure_style_files(styles: dict[str, StyleSection], model: ModelSection,
                       downloader: object = None) -> dict[str, Path]:
    """The path of every style's file, downloading those of ModelScope models that are missing
    (like the base model: resumable, never with ``offline``). Raises ``ModelFilesMissing``
    naming each missing file."""
    from engine.flux.model_files import (
        ModelFilesMissing,
        download_failed_message,
        modelscope_download,
    )

    paths = {name: style_path(style, model.models_dir) for name, style in styles.items()}
    for name, style in styles.items():
        path = paths[name]
        if path.is_file() or not style.model_id or model.offline:
            continue
        fetch = downloader or modelscope_download
        target = Path(model.models_dir) / style.model_id
        log.info("downloading style %s (%s: %s) into %s", name, style.model_id, style.file,
                 target)
        try:
            fetch(style.model_id, target, [style.file])  # type: ignore[operator]
        except Exception as exc:  # the network, the disk, the hub: say which
            raise ModelFilesMissing(download_failed_message(style.model_id, [style.file], target,
                                                            exc)) from None
    missing = [f"styles.{name}: {path}" for name, path in paths.items() if not path.is_file()]
    if missing:
        raise ModelFilesMissing(
            "LoRA files of styles are missing:\n  " + "\n  ".join(missing)
            + "\nput them there, correct [styles.<name>] file, or remove the style.")
    return paths


def lora_tag(name: str, styles: dict[str, StyleSection], models_dir: str) -> LoraTag | None:
    """What the PNG of a job with style ``name`` records (None: no style)."""
    style = styles.get(name) if name else None
    if style is None:
        return None
    path = style_path(style, models_dir)
    digest = ""
    if path.is_file():
        stat = path.stat()
        digest = short_hash(str(path), stat.st_size, stat.st_mtime_ns)
    return LoraTag(name, style.alpha, digest)


@lru_cache(maxsize=64)
def short_hash(path: str, size: int = 0, mtime_ns: int = 0) -> str:
    """AUTOMATIC1111's LoRA short hash: SHA-256 of a safetensors file's data after its header
    (so editing the metadata keeps it), first 12 hex digits. ``size``/``mtime_ns`` key the
    cache: a replaced file is hashed again."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:12]
