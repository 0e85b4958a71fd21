"""Float8 compute on a GPU: the CUDA kernel agrees with the CPU one, and ``max`` with
``model.float8_compute`` makes an image with the DiT's large layers in float8."""

from __future__ import annotations

import pytest

from engine.flux.backend import FluxBackend
from engine.flux.float8_compute import Float8Linear, check_float8_matmul, quantize_rows
from tests.gpu.test_flux_gpu import assert_real_image, model_section, request

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
GIB = 1024**3


def needs_float8() -> None:
    why = check_float8_matmul("cuda")
    if why:
        pytest.skip(why)


def test_cuda_float8_linear_equals_the_dequantized_product() -> None:
    """The CUDA kernel applies both row scales as the float32 arithmetic says (torch's CPU
    kernel takes per-tensor scales only before 2.14, so the reference is written out)."""
    needs_float8()
    torch.manual_seed(0)
    linear = torch.nn.Linear(3072, 12288).to("cuda", torch.bfloat16)
    x = torch.randn(2, 300, 3072, dtype=torch.bfloat16, device="cuda")
    x[0, 5] *= 40  # a loud token: its own scale keeps the others precise
    layer = Float8Linear.from_linear(linear)
    with torch.no_grad():
        got = layer(x).float()
        xq, xs = quantize_rows(x.reshape(-1, 3072))
        w = layer.weight.float() * layer.weight_scale.t()
        want = ((xq.float() * xs) @ w.t() + linear.bias.float()).reshape(got.shape)
        exact = linear(x).float()
    # Hopper's fast float8 accumulation and the bf16 output round a little differently from
    # fp32 arithmetic: compare each token's output vector, not single elements
    per_token = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert float(per_token.max()) < 1e-2
    assert float((got - exact).norm() / exact.norm()) < 0.05


def test_max_with_float8_compute_makes_an_image_in_less_memory(random_flux, cap_gpu) -> None:
    needs_float8()
    cap_gpu(None)
    config = model_section(random_flux, "max", None)
    config.float8_compute = True
    backend = FluxBackend(config)
    try:
        backend.load()
        report = backend.float8
        assert report is not None and report.layers == 19 * 8 + 38 * 2  # every block's big ones
        # 8.6 B weights (16 GiB in bf16) now take one byte each; the modulation layers
        # (3.2 B, one token per image) stay bf16
        assert report.bytes_saved > 7.5 * GIB
        # everything bf16 holds about 31.4 GiB after loading
        assert torch.cuda.memory_allocated() < 25 * GIB
        steps: list[tuple[int, int]] = []
        [image] = backend.generate(request(), lambda i, n: steps.append((i, n)))
        assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
        assert_real_image(image, 512)
    finally:
        backend.close()
