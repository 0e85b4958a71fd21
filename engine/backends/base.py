"""The backend protocol: ``load()``, ``generate(request, on_step) -> image``, ``close()``.

Every method is blocking and is called on the engine's one worker thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from engine.request import ImageRequest

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

# on_step(step, total) is called after each denoising step; it may raise to abort the job.
StepCallback = Callable[[int, int], None]


class Backend(Protocol):
    model_name: str

    def load(self) -> None: ...

    def generate(self, request: ImageRequest, on_step: StepCallback) -> Image: ...

    def close(self) -> None: ...

    def reduce_memory(self) -> bool:
        """After an out-of-memory error: free memory and tighten the plan; False if it cannot."""
        ...

    def memory_info(self) -> dict[str, float]: ...


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.cuda.OutOfMemoryError`` (and the engine's own), without importing torch."""
    from engine.errors import OutOfMemory

    return isinstance(exc, (OutOfMemory, MemoryError)) or type(exc).__name__ == "OutOfMemoryError"
