"""What a worker can run (its heartbeat says: largest pixels, batch, styles), and the sentence
for a job that no worker online can run. Pure Python: no NATS here."""

from __future__ import annotations

import math
from collections.abc import Iterable

from engine.cluster.messages import WorkerInfo
from engine.errors import N_, Phrase
from engine.request import ImageRequest


def job_pixels(request: ImageRequest) -> int:
    """The pixels one pass of the job needs: an upscale refines tiles, not its whole image."""
    if request.upscale_tile:
        return request.upscale_tile * request.upscale_tile
    return request.width * request.height


def can_run(worker: WorkerInfo, request: ImageRequest) -> bool:
    return (job_pixels(request) <= worker.max_pixels and request.count <= worker.max_count
            and (not request.style or request.style in worker.styles))


def best_fit(workers: Iterable[WorkerInfo], request: ImageRequest) -> WorkerInfo | None:
    """The smallest worker that can run the job, so the big cards stay free for the jobs only
    they can run."""
    fitting = [w for w in workers if can_run(w, request)]
    if not fitting:
        return None
    return min(fitting, key=lambda w: (w.max_pixels, w.max_count, len(w.styles), w.name))


def refusal(workers: list[WorkerInfo], request: ImageRequest) -> Phrase | None:
    """Why no worker online can run the job (a sentence for its user), or None if one can."""
    if any(can_run(w, request) for w in workers):
        return None
    if not workers:
        return Phrase(N_("No image worker is connected right now, so this image cannot be "
                         "made; please try again in a few minutes."))
    pixels = max(w.max_pixels for w in workers)
    if job_pixels(request) > pixels:
        side = math.isqrt(pixels)
        return Phrase(N_("None of the image workers online can make a {width}×{height} image: "
                         "the largest they make is {pixels} pixels (about {side}×{side}). "
                         "Please ask for a smaller --size."), width=request.width,
                      height=request.height, pixels=f"{pixels:,}", side=side)
    most = max(w.max_count for w in workers)
    if request.count > most:
        return Phrase(N_("None of the image workers online can make {count} images at once: "
                         "the most is {most}. Please ask for fewer with --n."),
                      count=request.count, most=most)
    styles = sorted({s for w in workers for s in w.styles})
    if request.style and request.style not in styles:
        if not styles:
            return Phrase(N_("None of the image workers online can make the style '{style}' "
                             "(they have no styles). Please leave --style out."),
                          style=request.style)
        return Phrase(N_("None of the image workers online can make the style '{style}' "
                         "(their styles: {styles}). Please pick another or leave --style out."),
                      style=request.style, styles=", ".join(styles))
    return Phrase(N_("None of the image workers online can make this size, number of images "
                     "and style together. Please ask for a smaller --size or fewer images."))
