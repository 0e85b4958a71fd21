"""A re-plan under compiled blocks (engine/flux/pipeline.py ``compile_dit_blocks``): with
``model.layer_cast`` the streamer moves blocks between bf16 and float8 by assigning their
weights' data in place, and the compiled blocks must then run the graph of the new dtype.

torch 2.11's dynamo skipped the dtype guards of a module whose dicts were unchanged and ran the
old dtype's graph: on an H100 the calibration's re-plan at 15.5 GiB failed with "self and mat2
must have the same dtype" and the bot fell back to eager blocks (4.7 s instead of 3.0 s an
image); on the CPU the same graphs returned values of 1e10. This test fails that way on torch
2.11 without the guard setting in ``compile_dit_blocks``; newer torch passes either way."""

from __future__ import annotations

import pytest
import torch

from engine.flux.pipeline import compile_dit_blocks, uncompile_dit_blocks
from engine.flux.residency import BF16, FP8
from engine.flux.streaming import enable_block_streaming
from tests.test_residency import DIM, make_models, plan_for


def inputs(batch: int, image_tokens: int, seed: int = 1, text_tokens: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.zeros(batch, text_tokens, 3),
                     torch.rand(batch, image_tokens, 3, generator=g) * 8], dim=1)
    return (torch.randn(batch, image_tokens, 16, generator=g).bfloat16(),
            torch.randn(batch, text_tokens, DIM, generator=g).bfloat16(),
            torch.randn(batch, DIM, generator=g).bfloat16(), ids)


# two sizes and a batch, as the warm-up compiles them (static, then dynamic graphs)
SHAPES = [(1, 16), (1, 4), (3, 16)]
# the first block of each type changes dtype both ways: the blocks that compiled the graphs
BEFORE = [BF16, FP8, FP8, BF16, FP8, FP8, FP8]
AFTER = [FP8, BF16, FP8, FP8, BF16, FP8, FP8]


@pytest.mark.parametrize("layer_cast", [True, False], ids=["layer-cast", "block-cast"])
def test_compiled_blocks_compute_the_same_after_a_replan_moves_blocks_between_dtypes(layer_cast):
    model, _ = make_models()
    handle = enable_block_streaming(model, plan_for(model, BEFORE), "cpu", layer_cast=layer_cast)
    compile_dit_blocks(model)
    try:
        with torch.no_grad():
            before = [model(*inputs(*shape)) for shape in SHAPES]
            for placements in (AFTER, BEFORE):
                handle.relayout(plan_for(model, placements))
                assert handle.plan.placements == tuple(placements)
                for shape, expected in zip(SHAPES, before, strict=True):
                    torch.testing.assert_close(model(*inputs(*shape)), expected,
                                               rtol=0, atol=0)
    finally:
        uncompile_dit_blocks(model)
        handle.close()
