"""The backend protocol: ``load()``, ``generate(request, on_step) -> images``, ``close()``.

``generate`` returns ``request.count`` images, for seeds ``request.seeds`` in order; with
``request.init_image`` it starts from that image (image-to-image at ``request.strength``).

Every method is blocking and is called on the engine's one worker thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from engine.request import ImageRequest

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

# on_step(step, total) is called after each denoising step; it may raise to abort the job.
# For several images ``total`` counts all their steps.
StepCallback = Callable[[int, int], None]


def per_image(on_step: StepCallback, index: int, count: int) -> StepCallback:
    """The job's progress while image ``index`` of ``count`` makes its steps."""
    def report(step: int, total: int) -> None:
        on_step(index * total + step, count * total)
    return report


def load_init_image(request: ImageRequest) -> Image:
    """The image an image-to-image request starts from, at the request's size, in RGB."""
    from PIL import Image as PILImage

    with PILImage.open(request.init_image) as image:
        return image.convert("RGB").resize((request.width, request.height),
                                           PILImage.Resampling.LANCZOS)


@dataclass(frozen=True)
class ModelState:
    """How the loaded model runs, for ``/status``: an admin sees a slow set-up at a glance."""

    preset: str  # the memory plan's preset: low, balanced, max
    dit_blocks: int | None = None  # the DiT's transformer blocks (None: not known)
    dit_blocks_on_gpu: int | None = None  # of them kept on the GPU, the rest streamed
    compiled: bool = False  # the DiT blocks run torch.compile'd graphs
    compile_failed: bool = False  # model.compile was on but compiling failed (eager; the log)
    loaded: bool = True  # False: a failed re-plan dropped the model; the next image reloads it


class Backend(Protocol):
    model_name: str

    def load(self) -> None: ...

    def generate(self, request: ImageRequest, on_step: StepCallback) -> list[Image]: ...

    def close(self) -> None: ...

    def reduce_memory(self) -> bool:
        """After an out-of-memory error: free memory and tighten the plan; False if it cannot."""
        ...

    def memory_info(self) -> dict[str, float]: ...

    def model_state(self) -> ModelState | None:
        """How the loaded model runs; None when there is nothing to say (no GPU model here)."""
        ...


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.cuda.OutOfMemoryError`` (and the engine's own), without importing torch."""
    from engine.errors import OutOfMemory

    return isinstance(exc, (OutOfMemory, MemoryError)) or type(exc).__name__ == "OutOfMemoryError"
