"""Where a job's images live: one PNG per image, ``<job id>-<seed>.png`` in the day's folder.

The journal keeps the first image's path (``result_path``); the others of a ``--n`` job sit
beside it, named by their seeds, so a restart and the retention find every one of them.
"""

from __future__ import annotations

from pathlib import Path

from engine import styles
from engine.config import Config
from engine.job import ResultImage
from engine.png import encode_png
from engine.request import ImageRequest


def path_of(folder: Path, job_id: str, seed: int) -> Path:
    return folder / f"{job_id}-{seed}.png"


def encode(images: object, request: ImageRequest, model_name: str,
           config: Config) -> list[bytes]:
    """One PNG per image, each with its own seed's parameters and the style's LoRA tag; PNG
    bytes made already (by a cluster's worker, with this same function) pass through."""
    if not isinstance(images, list) or len(images) != request.count:
        made = len(images) if isinstance(images, list) else "no list of"
        raise RuntimeError(f"the backend made {made} images for a job of {request.count}")
    pngs = []
    for index, image in enumerate(images):
        one = request.one(index)
        if isinstance(image, bytes):
            pngs.append(image)
            continue
        tag = styles.lora_tag(one.style, config.styles, config.model.models_dir)
        pngs.append(encode_png(image, one, model_name, tag))
    return pngs


def paths(first: str, request: ImageRequest) -> list[Path]:
    """Every image file of the job whose first image is at ``first``."""
    head = Path(first)
    job_id = head.name.rsplit("-", 1)[0]
    return [path_of(head.parent, job_id, seed) for seed in request.seeds]


def read(first: str, request: ImageRequest) -> tuple[ResultImage, ...] | None:
    """The job's images from disk, or None if any is missing (the result is gone)."""
    found = []
    for seed, path in zip(request.seeds, paths(first, request), strict=True):
        if not path.exists():
            return None
        found.append(ResultImage(path.read_bytes(), seed, str(path)))
    return tuple(found)


def siblings(first: str) -> list[Path]:
    """The first image and any others of its job (for deleting them all)."""
    head = Path(first)
    job_id = head.name.rsplit("-", 1)[0]
    return sorted(head.parent.glob(f"{job_id}-*.png")) or [head]
