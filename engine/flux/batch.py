"""Several images in one DiT pass.

diffsynth's ``FluxImagePipeline.__call__`` samples one image, but its units and
``model_fn_flux_image`` carry a batch dimension throughout. ``batched`` makes one call sample
one image per seed without copying its sampler: the noise is the seeds' noises stacked (each
exactly the noise a single image of that seed starts from), the prompt's embeddings are
repeated to the batch when the DiT is called, and the decode runs one latent at a time (the
plan budgets the VAE for one image) and returns a list of images. On a card that streams the
DiT, every streamed weight then crosses PCIe once per step for the whole batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from engine.backends.base import StepCallback

# The prompt's tensors that the DiT concatenates with, or adds to, the image's (batch first).
PROMPT_TENSORS = ("prompt_emb", "pooled_prompt_emb", "text_ids")


@contextlib.contextmanager
def batched(pipe: Any, seeds: Sequence[int]) -> Iterator[None]:
    """While inside, ``pipe(...)`` returns ``len(seeds)`` images, one per seed, in order.
    Everything is put back on exit, also after an exception."""
    import torch

    plain_noise, plain_model_fn = pipe.generate_noise, pipe.model_fn
    decoder = pipe.vae_decoder
    had_forward = "forward" in decoder.__dict__  # tile_vae's wrapper, if set
    inner_decode = decoder.forward
    had_to_image = "vae_output_to_image" in pipe.__dict__
    to_image = pipe.vae_output_to_image

    def generate_noise(shape: Sequence[int], seed: int | None = None, **kwargs: Any) -> Any:
        return torch.cat([plain_noise(shape, seed=s, **kwargs) for s in seeds])

    def model_fn(**inputs: Any) -> Any:
        batch = inputs["latents"].shape[0]
        for name in PROMPT_TENSORS:
            value = inputs.get(name)
            if value is not None and value.shape[0] == 1 and batch > 1:
                inputs[name] = value.expand(batch, *value.shape[1:])
        return plain_model_fn(**inputs)

    def decode(sample: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(sample, "ndim", 0) < 1 or sample.shape[0] <= 1:  # a tiled decode's tiles
            return inner_decode(sample, *args, **kwargs)
        return torch.cat([inner_decode(sample[i:i + 1], *args, **kwargs)
                          for i in range(sample.shape[0])])

    def images(output: Any, *args: Any, **kwargs: Any) -> list[Any]:
        return [to_image(output[i:i + 1], *args, **kwargs) for i in range(output.shape[0])]

    pipe.generate_noise, pipe.model_fn = generate_noise, model_fn
    decoder.forward, pipe.vae_output_to_image = decode, images
    try:
        yield
    finally:
        pipe.generate_noise, pipe.model_fn = plain_noise, plain_model_fn
        if had_forward:
            decoder.forward = inner_decode
        else:
            del decoder.forward
        if had_to_image:
            pipe.vae_output_to_image = to_image
        else:
            del pipe.vae_output_to_image  # the class's method again


def per_batch(on_step: StepCallback, first: int, size: int, count: int) -> StepCallback:
    """The job's progress while images ``first`` … ``first + size - 1`` of ``count`` make their
    steps together: each step of the pass is a step of every image in it."""
    def report(step: int, total: int) -> None:
        on_step(first * total + step * size, count * total)
    return report


def batch_sizes(count: int, size: int) -> list[tuple[int, int]]:
    """(first image, images) of each pass for a job of ``count`` images, ``size`` at most per
    pass: 4 by 2 is two passes of two, 3 by 2 is two then one."""
    size = max(1, size)
    return [(first, min(size, count - first)) for first in range(0, count, size)]
