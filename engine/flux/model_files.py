"""Which model files the FLUX backend needs, where they are expected, and fetching the missing ones.

Pure Python (no torch): ``describe_model_files`` is what ``doctor`` prints. Downloads go through
ModelScope into ``models_dir/<model id>/``; ModelScope shows a progress bar per file and resumes a
partial file (``*.incomplete``) after an interruption. A ``*_path`` setting replaces one entry and
is never downloaded; ``offline = true`` downloads nothing and names what is missing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.config import ModelSection
from engine.errors import EngineError

log = logging.getLogger(__name__)
Downloader = Callable[[str, Path, list[str]], None]  # (model id, local dir, file patterns)


class ModelFilesMissing(EngineError):
    """A model file is missing and may not (or could not) be downloaded; the message says which."""


@dataclass(frozen=True)
class ModelEntry:
    name: str  # dit, text_encoder, text_encoder_2, vae, tokenizer, tokenizer_2
    setting: str  # the config key that replaces it with a local path
    model_id: str
    pattern: str  # ModelScope file pattern inside the model repository
    path: Path  # the file or folder that must exist
    local: bool  # True when the path comes from the ``*_path`` setting
    is_dir: bool
    approx_bytes: int | None  # what a download brings, roughly (for doctor)


@dataclass(frozen=True)
class ModelFileStatus:
    name: str
    path: str
    present: bool
    size_bytes: int | None
    will_download: bool
    # "MAILAND/majicflus_v1: majicflus_v134.safetensors" or "local path (model.dit_path)"
    source: str
    approx_bytes: int | None = None


@dataclass(frozen=True)
class ModelPaths:
    """What the pipeline loads (every path exists)."""

    dit: str
    text_encoder: str
    text_encoder_2: list[str]  # the T5 shards
    vae: str
    tokenizer: str
    tokenizer_2: str


# Sizes of the FLUX.1-dev files on the hub, approximately (bytes).
_APPROX = {"text_encoder": 246_000_000, "text_encoder_2": 9_525_000_000, "vae": 335_000_000,
           "tokenizer": 2_000_000, "tokenizer_2": 3_000_000}
_T5_SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def model_entries(config: ModelSection) -> list[ModelEntry]:
    root = Path(config.models_dir)
    flux = config.flux_model_id
    rows = [
        ("dit", "dit_path", config.dit_model_id, config.dit_file, False),
        ("text_encoder", "text_encoder_path", flux, "text_encoder/model.safetensors", False),
        ("text_encoder_2", "text_encoder_2_path", flux, "text_encoder_2/*", True),
        ("vae", "vae_path", flux, "ae.safetensors", False),
        ("tokenizer", "tokenizer_path", flux, "tokenizer/*", True),
        ("tokenizer_2", "tokenizer_2_path", flux, "tokenizer_2/*", True),
    ]
    entries = []
    for name, setting, model_id, pattern, is_dir in rows:
        override = getattr(config, setting)
        default = root / model_id / (pattern[:-2] if pattern.endswith("/*") else pattern)
        path = Path(override).expanduser() if override else default
        entries.append(ModelEntry(name, setting, model_id, pattern, path, bool(override), is_dir,
                                  _APPROX.get(name)))
    return entries


def _present(entry: ModelEntry) -> bool:
    path = entry.path
    if not entry.is_dir:
        return path.is_file()
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir() if p.is_file()}
    if entry.name == "text_encoder_2":
        return _t5_complete(path, names, entry.local)
    if entry.name == "tokenizer":
        return {"vocab.json", "merges.txt"} <= names or "tokenizer.json" in names
    return "tokenizer.json" in names or "spiece.model" in names


def _t5_complete(path: Path, names: set[str], local: bool) -> bool:
    """Both hub shards, or (for a local folder) the shards its index names, or any shard."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wanted = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            return False
        return wanted <= names
    if local:
        return any(n.endswith(".safetensors") for n in names)
    return set(_T5_SHARDS) <= names


def _size(entry: ModelEntry) -> int | None:
    if not entry.path.exists():
        return None
    if entry.path.is_file():
        return entry.path.stat().st_size
    return sum(p.stat().st_size for p in entry.path.rglob("*") if p.is_file())


def describe_model_files(config: ModelSection) -> list[ModelFileStatus]:
    """One row per model entry: where it is expected, whether it is there, whether it will be
    downloaded at start-up. Touches only the file system."""
    rows = []
    for entry in model_entries(config):
        present = _present(entry)
        source = (f"local path (model.{entry.setting})" if entry.local
                  else f"{entry.model_id}: {entry.pattern}")
        rows.append(ModelFileStatus(
            name=entry.name, path=str(entry.path), present=present,
            size_bytes=_size(entry) if present else None,
            will_download=not present and not entry.local and not config.offline,
            source=source, approx_bytes=None if entry.local else entry.approx_bytes))
    return rows


def missing_message(entries: Sequence[ModelEntry], offline: bool) -> str:
    lines = []
    for e in entries:
        if e.local:
            lines.append(f"{e.name}: {e.path} (set by model.{e.setting}) does not exist")
        else:
            lines.append(f"{e.name}: expected at {e.path} ({e.model_id}: {e.pattern})")
    fix = ("model.offline is true, so nothing is downloaded: put the files there, point the "
           "model.*_path settings at them, or set offline = false"
           if offline else
           "check the network and the disk space, then start again (downloads resume)")
    return "Model files are missing:\n  " + "\n  ".join(lines) + f"\n{fix}."


def download_failed_message(model_id: str, patterns: Sequence[str], target: Path,
                            exc: BaseException) -> str:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    done = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) if target.exists() else 0
    return (f"Downloading {model_id} ({', '.join(patterns)}) from ModelScope failed: {reason}\n"
            f"{done / 1e9:.1f} GB of it is in {target} so far. Check the network and the disk "
            "space, then start again: the download resumes where it stopped.")


def ensure_model_files(config: ModelSection, downloader: Downloader | None = None) -> ModelPaths:
    """Download what is missing (unless offline) and return the paths to load."""
    entries = model_entries(config)
    missing = [e for e in entries if not _present(e)]
    if any(e.local for e in missing) or (missing and config.offline):
        raise ModelFilesMissing(missing_message(missing, config.offline))
    if missing:
        fetch = downloader or modelscope_download
        for model_id in dict.fromkeys(e.model_id for e in missing):
            patterns = [e.pattern for e in missing if e.model_id == model_id]
            target = Path(config.models_dir) / model_id
            log.info("downloading %s (%s) from ModelScope into %s", model_id, ", ".join(patterns),
                     target)
            try:
                fetch(model_id, target, patterns)
            except Exception as exc:  # the network, the disk, the hub: say which and how far
                raise ModelFilesMissing(download_failed_message(model_id, patterns, target,
                                                                exc)) from None
        still = [e for e in entries if not _present(e)]
        if still:
            raise ModelFilesMissing(missing_message(still, offline=False))
    return _paths(entries)


def _paths(entries: list[ModelEntry]) -> ModelPaths:
    by_name = {e.name: e.path for e in entries}
    shards = sorted(str(p) for p in by_name["text_encoder_2"].glob("*.safetensors"))
    return ModelPaths(dit=str(by_name["dit"]), text_encoder=str(by_name["text_encoder"]),
                      text_encoder_2=shards, vae=str(by_name["vae"]),
                      tokenizer=str(by_name["tokenizer"]), tokenizer_2=str(by_name["tokenizer_2"]))


def modelscope_download(model_id: str, target: Path, patterns: list[str]) -> None:
    """ModelScope's own snapshot download: a progress bar per file, resumes partial files."""
    from modelscope import snapshot_download

    target.mkdir(parents=True, exist_ok=True)
    snapshot_download(model_id, local_dir=str(target), allow_file_pattern=patterns)
