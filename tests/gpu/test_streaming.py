"""The float8 block streamer on a GPU, with diffsynth's FluxDiT at full size and random weights.

A 512² image (4 denoising steps through diffsynth's ``model_fn_flux_image``, then a VAE decode
after diffsynth's own phase change, which releases the streamer's buffers) made with most blocks
streamed under an emulated 8 GiB card equals the one made with every block resident; a 1024²
image runs under an emulated 6 GiB card. The peak stays under the cap and within the plan.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
pytest.importorskip("diffsynth")

from bench.bench_streaming import denoise, flux_inputs, random_flux_dit  # noqa: E402
from engine.flux.residency import (  # noqa: E402
    BF16,
    GIB,
    STREAMED,
    dit_activation_bytes,
    plan_residency,
    vae_decode_bytes,
)
from engine.flux.streaming import (  # noqa: E402
    enable_block_streaming,
    largest_casts_bytes,
    measure_blocks,
)

RESERVE = dit_activation_bytes(1024, 1024)


@pytest.fixture(scope="module")
def dit():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return random_flux_dit()


@pytest.fixture(scope="module")
def vae():
    from diffsynth.models.flux_vae import FluxVAEDecoder

    torch.manual_seed(0)
    return FluxVAEDecoder().to("cuda", torch.bfloat16).eval()


def make_image(dit, vae, size: int, steps: int, seed: int = 3) -> tuple:
    """Denoise, then decode after diffsynth's phase change (``load_models_to_device``)."""
    from diffsynth.pipelines.flux_image import FluxImagePipeline

    pipe = FluxImagePipeline(device="cuda", torch_dtype=torch.bfloat16)
    pipe.dit, pipe.vae_decoder, pipe.vram_management_enabled = dit, vae, True
    pipe.load_models_to_device(["dit"])
    latents = denoise(dit, flux_inputs(size, size, seed=seed), steps)
    pipe.load_models_to_device(["vae_decoder"])
    with torch.no_grad():
        image = vae(latents)
    return latents, image


def plan_for(dit, budget_bytes: int, vae=None, layer_cast: bool = False):
    sizes, fixed = measure_blocks(dit)
    vae_weights = 0 if vae is None else sum(p.numel() * 2 for p in vae.parameters())
    return plan_residency(sizes, budget_bytes, RESERVE, fixed_bytes=fixed + vae_weights,
                          phase_reserve_bytes=vae_decode_bytes(1024, 1024),
                          layer_cast_bytes=largest_casts_bytes(dit) if layer_cast else 0)


def test_streamed_512_image_equals_the_resident_one(dit, vae, cap_gpu, layer_cast):
    resident_plan = plan_for(dit, 60 * GIB)
    assert resident_plan.count(BF16) == len(resident_plan.placements)
    with enable_block_streaming(dit, resident_plan, "cuda"):
        want_latents, want_image = make_image(dit, vae, 512, 4)

    cap_gpu(8)
    plan = plan_for(dit, 8 * GIB, vae, layer_cast)
    assert plan.count(STREAMED) > 0
    with enable_block_streaming(dit, plan, "cuda", layer_cast=layer_cast) as handle:
        handle.follow_pipeline_phases()
        torch.cuda.reset_peak_memory_stats()
        got_latents, got_image = make_image(dit, vae, 512, 4)
        stats = handle.stats()
    assert stats["pinned"] and stats["passes"] == 4 and stats["releases"] == 1
    assert stats["bytes_streamed"] >= 4 * plan.streamed_bytes
    assert torch.cuda.max_memory_reserved() <= 8 * GIB
    assert torch.cuda.max_memory_allocated() <= plan.peak_bytes
    assert torch.isfinite(got_latents).all() and torch.isfinite(got_image).all()
    torch.testing.assert_close(got_latents, want_latents, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got_image, want_image, rtol=2e-2, atol=2e-2)


def test_1024_image_runs_under_6_gib(dit, vae, cap_gpu):
    cap_gpu(6)
    plan = plan_for(dit, 6 * GIB, vae)
    with enable_block_streaming(dit, plan, "cuda") as handle:
        handle.follow_pipeline_phases()
        torch.cuda.reset_peak_memory_stats()
        latents, image = make_image(dit, vae, 1024, 2)
        assert handle.stats()["passes"] == 2
    assert torch.isfinite(latents).all() and image.shape[-2:] == (1024, 1024)
    assert torch.cuda.max_memory_reserved() <= 6 * GIB
    assert torch.cuda.max_memory_allocated() <= plan.peak_bytes
    # closed: every weight is back on the CPU and nothing of ours holds GPU memory
    assert all(p.device.type == "cpu" for p in dit.parameters())
