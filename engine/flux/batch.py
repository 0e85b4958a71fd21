"""Several images in one DiT pass.

diffsynth's ``FluxImagePipeline.__call__`` samples one image, but its units and
``model_fn_flux_image`` carry a batch dimension throughout. ``batched`` makes one call sample
one image per seed without copying its sampler: the noise is the seeds' noises stacked (each
exactly the noise a single image of that seed starts from), the prompt's embeddings are
repeated to the batch when the DiT is called, and the decode runs one latent at a time (the
plan budgets the VAE for one image) and returns a list of images. On a card that streams the
DiT, every streamed weight then crosses PCIe once per step for the whole batch.

Inside each DiT block the batch is computed ``chunk`` images at a time (``chunked_blocks``):
a block's activations (0.7 GiB per 1024² image) are held for one chunk only, while the other
images wait as their rows of the block's input and output (28 MB each), so four images cost
the card little more than one and their weights still cross once. The compiled block sees the
chunk, never the whole batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from engine.backends.base import StepCallback

# The prompt's tensors that the DiT concatenates with, or adds to, the image's (batch first).
PROMPT_TENSORS = ("prompt_emb", "pooled_prompt_emb", "text_ids")


@contextlib.contextmanager
def batched(pipe: Any, seeds: Sequence[int], chunk: int = 1) -> Iterator[None]:
    """While inside, ``pipe(...)`` returns ``len(seeds)`` images, one per seed, in order, each
    DiT block computing ``chunk`` of them at a time. Everything is put back on exit, also after
    an exception."""
    import torch

    from engine.flux.streaming import dit_blocks

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
        dit = getattr(pipe, "dit", None)
        with chunked_blocks([] if dit is None else dit_blocks(dit), chunk):
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


@contextlib.contextmanager
def chunked_blocks(blocks: Sequence[Any], chunk: int) -> Iterator[None]:
    """While inside, each block's forward runs a batch ``chunk`` images at a time and returns
    what one call over the whole batch would. Wrapped inside the module's call, so the
    streamer's hooks load a block's weights once for all its chunks."""
    saved = [(block, block.__dict__.get("forward")) for block in blocks]
    for block in blocks:
        block.forward = _chunked(block.forward, max(1, chunk))
    try:
        yield
    finally:
        for block, own in saved:
            if own is None:
                del block.forward  # the class's forward again
            else:
                block.forward = own  # compile_dit_blocks' compiled forward


def _chunked(forward: Any, chunk: int) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        batch = args[0].shape[0]
        if batch <= chunk:
            return forward(*args, **kwargs)
        whole: tuple[Any, ...] = ()
        for start in range(0, batch, chunk):
            rows = slice(start, min(batch, start + chunk))
            out = forward(*(_rows(a, batch, rows) for a in args), **kwargs)
            parts = out if isinstance(out, tuple) else (out,)
            if not whole:  # the outputs of the whole batch, filled chunk by chunk
                whole = tuple(p.new_empty((batch, *p.shape[1:])) for p in parts)
            for into, part in zip(whole, parts, strict=True):
                into[rows] = part
        return whole if isinstance(out, tuple) else whole[0]
    return run


def _rows(value: Any, batch: int, rows: slice) -> Any:
    """A chunk's rows of a batch-first tensor; anything else (the rotary embedding shared by
    the batch, masks, None) as it is."""
    shape = getattr(value, "shape", None)
    return value[rows] if shape is not None and len(shape) > 0 and shape[0] == batch else value


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
