"""A batch through diffsynth's own FLUX blocks, computed a chunk of images at a time inside each
block (engine/flux/batch.py ``chunked_blocks``): the same result as the whole batch at once,
the block's hooks (the streamer's weight loading) run once per block, not once per chunk."""

from __future__ import annotations

import pytest
import torch
from diffsynth.models.flux_dit import (
    FluxJointTransformerBlock,
    FluxSingleTransformerBlock,
    RoPEEmbedding,
)

from engine.flux.batch import chunked_blocks

DIM, HEADS, IMAGE, TEXT = 64, 2, 16, 8


def tiny_blocks() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [FluxJointTransformerBlock(DIM, HEADS).eval(),
            FluxSingleTransformerBlock(DIM, HEADS).eval()]


def batch_inputs(batch: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(batch, IMAGE, DIM, generator=g)
    prompt = torch.randn(batch, TEXT, DIM, generator=g)
    temb = torch.randn(batch, DIM, generator=g)
    # each image its own positions, so a chunk given another image's rotary rows would differ
    ids = torch.randint(0, 32, (batch, TEXT + IMAGE, 3), generator=g).float()
    rope = RoPEEmbedding(DIM, 10000, [8, 12, 12])(ids)
    return image, prompt, temb, rope


def model_fn(blocks: list[torch.nn.Module], image, prompt, temb, rope) -> torch.Tensor:
    """diffsynth's model_fn_flux_image's block loop, in small."""
    image, prompt = blocks[0](image, prompt, temb, rope, None, ipadapter_kwargs_list=None)
    joined = torch.cat([prompt, image], dim=1)
    joined, prompt = blocks[1](joined, prompt, temb, rope, None, ipadapter_kwargs_list=None)
    return joined[:, prompt.shape[1]:]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_a_batch_computed_a_chunk_at_a_time_is_the_whole_batch(chunk: int) -> None:
    blocks, inputs = tiny_blocks(), batch_inputs(3)
    with torch.no_grad():
        whole = model_fn(blocks, *inputs)
        with chunked_blocks(blocks, chunk):
            chunked = model_fn(blocks, *inputs)
        alone = torch.cat([model_fn(blocks, *(t[i:i + 1] for t in inputs)) for i in range(3)])
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, alone, rtol=1e-5, atol=1e-5)
    assert all("forward" not in block.__dict__ for block in blocks)  # the class's forward again


def test_a_blocks_hooks_run_once_for_all_its_chunks_and_its_own_forward_comes_back() -> None:
    """The streamer loads a block's weights in a forward pre-hook: once per block call. A
    forward set on the block (compile_dit_blocks' compiled one) is what runs each chunk, and is
    the block's forward again afterwards, also after an error."""
    blocks, inputs = tiny_blocks(), batch_inputs(3)
    hooks, chunks = [0, 0], [0, 0]
    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=index: hooks.__setitem__(i, hooks[i] + 1))
        plain = block.forward

        def counted(*args, _plain=plain, _i=index, **kwargs):
            chunks[_i] += 1
            return _plain(*args, **kwargs)

        block.forward = counted
    with torch.no_grad(), chunked_blocks(blocks, 1):
        model_fn(blocks, *inputs)
    assert hooks == [1, 1] and chunks == [3, 3]
    assert all(block.forward.__name__ == "counted" for block in blocks)

    with pytest.raises(RuntimeError, match="out of memory"), chunked_blocks(blocks, 1):
        raise RuntimeError("CUDA out of memory")
    assert all(block.forward.__name__ == "counted" for block in blocks)
