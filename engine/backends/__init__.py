"""Image backends: the narrow seam between the engine and the GPU."""

from __future__ import annotations

from engine.backends.base import Backend, ModelState, StepCallback
from engine.config import Config


def create_backend(config: Config) -> Backend:
    """The backend named by ``engine.backend``; the FLUX one is imported only when asked for."""
    if config.engine.backend == "dry-run":
        from engine.backends.dry_run import DryRunBackend

        return DryRunBackend(step_seconds=config.engine.dry_run_step_s)
    from engine.flux.backend import FluxBackend

    return FluxBackend(config.model, max_pixels=config.limits.max_pixels,
                       max_images=config.limits.images_max, styles=config.styles)


__all__ = ["Backend", "ModelState", "StepCallback", "create_backend"]
