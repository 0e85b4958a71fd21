"""Models parked in host memory between their phases (engine/flux/parking.py), on the CPU: the
"device" copies are CPU tensors of their own, so every pointer move is observable here."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from engine.flux.parking import ParkedModel, park_module  # noqa: E402

BF16 = torch.bfloat16


class Tied(torch.nn.Module):
    """Two dtypes, a buffer and a weight shared by two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8).to(BF16)
        self.b = torch.nn.Linear(8, 8, bias=False).to(BF16)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.full((8,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) * self.scale.to(x.dtype)


def _inside(t: torch.Tensor, flat: torch.Tensor) -> bool:
    start = flat.data_ptr()
    return start <= t.data_ptr() < start + flat.nbytes


def where(parked: ParkedModel, module: torch.nn.Module) -> set[str]:
    """'host' / 'device' for each tensor of the module: which flat buffer it views."""
    places = set()
    for t in [*module.parameters(), *module.buffers()]:
        flats = parked.host if not parked.fetched else parked.on_device
        assert flats is not None
        assert _inside(t, flats[t.dtype]), "a tensor outside the parked buffers"
        places.add("device" if parked.fetched else "host")
    return places


def test_a_parked_model_is_fetched_by_its_call_and_parked_by_the_phase_change():
    torch.manual_seed(0)
    model, x = Tied(), torch.randn(2, 8, dtype=BF16)
    expected = model(x)
    parked = park_module(model, "cpu")
    assert where(parked, model) == {"host"} and not parked.fetched
    assert model.b.weight is model.a.weight  # still tied: packed once
    assert parked.nbytes >= (8 * 8 + 8) * 2 + 8 * 4
    assert torch.equal(model(x), expected)  # the pre-hook fetched first
    assert where(parked, model) == {"device"} and parked.fetches == 1
    model(x)
    assert parked.fetches == 1  # once per phase
    model.offload()  # what diffsynth's load_models_to_device calls on a model not needed next
    assert where(parked, model) == {"host"}
    assert torch.equal(model(x), expected) and parked.fetches == 2
    parked.close()
    assert not parked.fetched and "offload" not in model.__dict__
    assert not getattr(model, "vram_management_enabled", False)
    assert torch.equal(model(x), expected) and parked.fetches == 2  # unhooked, host weights


def test_a_fetch_that_runs_out_of_memory_leaves_the_model_parked(monkeypatch):
    torch.manual_seed(1)
    model, x = Tied(), torch.randn(2, 8, dtype=BF16)
    expected = model(x)
    parked = park_module(model, "cpu")
    real, calls = torch.empty_like, []

    def second_fails(t, **kwargs):
        calls.append(t.dtype)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return real(t, **kwargs)

    monkeypatch.setattr(torch, "empty_like", second_fails)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        model(x)
    assert not parked.fetched and where(parked, model) == {"host"}
    monkeypatch.setattr(torch, "empty_like", real)
    assert torch.equal(model(x), expected)


def test_parking_keeps_the_offload_a_streamer_set():
    model = Tied()
    released = []
    model.vram_management_enabled = True
    model.offload = lambda: released.append(1)
    parked = park_module(model, "cpu", [model.a.weight])  # some tensors only
    model(torch.ones(1, 8, dtype=BF16))
    assert parked.fetched and _inside(model.a.weight, parked.on_device[BF16])
    assert not _inside(model.a.bias, parked.on_device[BF16])  # not parked: left where it was
    model.offload()
    assert released == [1] and not parked.fetched
    parked.close()
    model.offload()
    assert released == [1, 1] and model.vram_management_enabled  # the streamer's again


def test_diffsynth_phase_changes_park_the_text_encoders_and_the_vae():
    """diffsynth's own ``load_models_to_device`` (what ``FluxImagePipeline.__call__`` runs
    between its phases) with the pipeline's real attributes and a block-streamed T5."""
    from diffsynth.pipelines.flux_image import FluxImagePipeline
    from transformers import T5Config, T5EncoderModel

    from engine.flux.pipeline import T5_BLOCKS, park_other_models
    from engine.flux.residency import STREAMED, ResidencyPlan
    from engine.flux.streaming import enable_block_streaming, measure_blocks

    torch.manual_seed(2)
    pipe = FluxImagePipeline(device="cpu", torch_dtype=BF16)
    pipe.text_encoder_1, pipe.vae_encoder, pipe.vae_decoder = Tied(), Tied(), Tied()
    config = T5Config(vocab_size=96, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=3,
                      feed_forward_proj="gated-gelu")
    t5 = T5EncoderModel(config).eval().to(torch.float8_e4m3fn)
    sizes, fixed = measure_blocks(t5, block_lists=T5_BLOCKS)
    plan = ResidencyPlan(placements=(STREAMED,) * len(sizes), block_bytes=tuple(sizes),
                         budget_bytes=2**40, reserve_bytes=0, fixed_bytes=fixed, slots=2)
    handle = enable_block_streaming(t5, plan, "cpu", block_lists=T5_BLOCKS)
    handle.follow_pipeline_phases()
    pipe.text_encoder_2 = t5
    ids = torch.randint(0, 96, (1, 7))
    expected_t5 = t5(ids).last_hidden_state
    handle.release_buffers()  # as start_t5_streaming leaves it: block weights view nothing
    parked = dict(zip(("clip", "vae_encoder", "vae_decoder", "t5"),
                      park_other_models(pipe, "cpu", handle), strict=True))
    streamed = {id(p) for p in handle.packed_parameters()}
    assert streamed and not any(id(s.tensor) in streamed
                                for slots in parked["t5"].slots.values() for s in slots)
    # T5's embedding and norms, not its blocks (each tensor starts 256-byte aligned)
    assert fixed <= parked["t5"].nbytes < fixed + 8 * 256
    pipe.vram_management_enabled = True

    x = torch.ones(1, 8, dtype=BF16)
    pipe.text_encoder_1(x)
    assert torch.equal(pipe.text_encoder_2(ids).last_hidden_state, expected_t5)
    assert parked["clip"].fetched and parked["t5"].fetched and handle._work is not None
    pipe.load_models_to_device(pipe.in_iteration_models)  # the denoising loop's phase
    assert not any(p.fetched for p in parked.values())
    assert handle._work is None  # the streamer's own offload ran too
    pipe.load_models_to_device(["vae_decoder"])
    pipe.vae_decoder(x)
    assert [n for n, p in parked.items() if p.fetched] == ["vae_decoder"]
    pipe.load_models_to_device([])
    assert not any(p.fetched for p in parked.values())
    for p in parked.values():
        p.close()
    assert t5.offload == handle.release_buffers  # the streamer's own phase hook again
    assert torch.equal(t5(ids).last_hidden_state, expected_t5)
    handle.close()


def test_models_under_diffsynths_management_are_left_to_it():
    from diffsynth.pipelines.flux_image import FluxImagePipeline

    from engine.flux.pipeline import park_other_models

    pipe = FluxImagePipeline(device="cpu", torch_dtype=BF16)
    pipe.text_encoder_1, pipe.vae_decoder = Tied(), Tied()
    pipe.vae_decoder.vram_management_enabled = True
    parked = park_other_models(pipe, "cpu")  # and no T5 streamer: T5 left alone
    assert len(parked) == 1 and "offload" in pipe.text_encoder_1.__dict__
    assert "offload" not in pipe.vae_decoder.__dict__


def test_a_failure_part_way_through_parking_leaves_every_parked_model_to_close(monkeypatch):
    from diffsynth.pipelines.flux_image import FluxImagePipeline

    from engine.flux import parking
    from engine.flux.pipeline import park_other_models

    pipe = FluxImagePipeline(device="cpu", torch_dtype=BF16)
    pipe.text_encoder_1, pipe.vae_encoder, pipe.vae_decoder = Tied(), Tied(), Tied()
    real, calls = parking.park_module, []

    def third_fails(module, device, tensors=None):
        calls.append(module)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return real(module, device, tensors)

    monkeypatch.setattr(parking, "park_module", third_fails)
    done: list = []
    with pytest.raises(torch.cuda.OutOfMemoryError):
        park_other_models(pipe, "cpu", into=done)
    assert len(done) == 2 and all(isinstance(p, ParkedModel) for p in done)
    for p in done:
        p.close()
    assert "offload" not in pipe.text_encoder_1.__dict__
