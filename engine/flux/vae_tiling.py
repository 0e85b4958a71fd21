"""Tile the VAE alone: its decode, and the encode of an image-to-image start.

diffsynth's pipeline takes one ``tiled`` flag for the VAE and the DiT: with it set, the DiT also
runs tile by tile, a whole pass over every weight for each 512² tile (nine passes a step at
1024²: nine times the streamed bytes, measured 1.46 s a step against 0.16 on an 8 GB card). The
memory plan only ever wants the VAE tiled, so the backend passes ``tiled=False`` and this makes
the decoder and the encoder tile themselves. Both run as phases of their own, budgeted as the
tiled decode (``residency.VAE_TILED_BYTES``): an untiled 1024² encode ran out of memory on an
emulated 8 GB card whose plan had tiled only the decode.
"""

from __future__ import annotations

from typing import Any

# Latent units. diffsynth's default 128-latent tiles fail below 1024 px; 64/32 works at any size,
# and residency.VAE_TILED_BYTES was measured with it.
TILE_SIZE = 64
TILE_STRIDE = 32
# The encoder tiles the image in pixels: the same 512-pixel tiles.
ENCODE_TILE_SIZE = TILE_SIZE * 8
ENCODE_TILE_STRIDE = TILE_STRIDE * 8


def tile_vae(pipe: Any, tiled: bool) -> None:
    """Make ``pipe.vae_decoder`` and ``pipe.vae_encoder`` run in tiles (or undo it).
    Idempotent; a pipeline without them (a test's fake) is left alone."""
    _force_tiles(getattr(pipe, "vae_decoder", None), tiled, TILE_SIZE, TILE_STRIDE)
    _force_tiles(getattr(pipe, "vae_encoder", None), tiled, ENCODE_TILE_SIZE, ENCODE_TILE_STRIDE)


def _force_tiles(module: Any, tiled: bool, size: int, stride: int) -> None:
    if module is None:
        return
    current = module.__dict__.get("forward")
    if not tiled:
        if current is not None:
            del module.forward
        return
    if current is not None:
        return
    plain = type(module).forward
    inside = [False]  # diffsynth's tiled pass calls forward again for each tile, untiled

    def forward(sample: Any, *args: Any, tiled: bool = False, tile_size: int = size,
                tile_stride: int = stride, **kwargs: Any) -> Any:
        if inside[0]:
            return plain(module, sample, *args, tiled=tiled, tile_size=tile_size,
                         tile_stride=tile_stride, **kwargs)
        inside[0] = True
        try:
            return plain(module, sample, *args, tiled=True, tile_size=size,
                         tile_stride=stride, **kwargs)
        finally:
            inside[0] = False

    module.forward = forward
