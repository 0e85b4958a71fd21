"""The device budget: the planner's arithmetic for every card size and image shape the limits
allow, and the backend's start-up calibration and out-of-memory re-plans on a fake card (a
fake pipeline whose memory use follows the plan, and the driver's free-memory figures)."""

from __future__ import annotations

import dataclasses
import gc
import math
import weakref
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import ModelSection
from engine.flux.device_budget import (
    CALIBRATION_SAFETY_GIB,
    GIB,
    calibration_excess_gib,
    device_budget,
    reserve_side,
    warm_up_side,
)
from engine.flux.presets import plan_memory, with_less
from engine.flux.residency import (
    FLUX_FIXED_BYTES,
    FLUX_OTHER_WEIGHTS,
    OtherWeights,
    ResidencyError,
    dit_activation_bytes,
    dit_residency,
    flux_dev_block_sizes,
    t5_phase_bytes,
    vae_decode_bytes,
)

CARDS_FREE_GIB = [5.6, 7.5, 9.5, 11.5, 15.5, 23.0, 31.0, 47.0, 79.0]
PIXEL_LIMITS = [512 * 512, 768 * 768, 1_048_576, 1280 * 1024, 1536 * 1536]


@pytest.mark.parametrize("free", CARDS_FREE_GIB)
@pytest.mark.parametrize("vram_limit", [0.0, 6.0, 8.0])
def test_the_parts_add_up_to_the_device_budget(free, vram_limit):
    budget = device_budget(vram_limit, free)
    device = vram_limit or free + budget.context_gib
    assert budget.device_gib == device
    parts = budget.context_gib + budget.runtime_gib + budget.margin_gib + budget.allocator_gib
    assert parts == pytest.approx(device)
    assert budget.growth_gib == pytest.approx(vram_limit - budget.context_gib if vram_limit
                                              else free)
    assert "device budget" in budget.describe() and f"{device:.2f} GiB" in budget.describe()


def test_no_gpu_figure_means_no_budget():
    assert device_budget(0.0, None) is None
    assert device_budget(8.0, None).device_gib == 8.0


def planned_dit(free: float, max_pixels: int):
    """The streaming plan and the DiT's residency for FLUX.1-dev on a card with ``free``."""
    plan = plan_memory(ModelSection(), free, 0.5, max_pixels)
    residency = dit_residency(plan, flux_dev_block_sizes(), FLUX_FIXED_BYTES,
                              FLUX_OTHER_WEIGHTS)
    return plan, residency


@pytest.mark.parametrize("free", CARDS_FREE_GIB)
@pytest.mark.parametrize("max_pixels", PIXEL_LIMITS)
def test_every_card_gets_a_plan_inside_its_budget_or_a_clear_refusal(free, max_pixels):
    plan = plan_memory(ModelSection(), free, 0.5, max_pixels)
    if plan.preset == "max":
        assert plan.budget_gib >= 36
        return
    try:
        plan, residency = planned_dit(free, max_pixels)
    except ResidencyError as e:  # only where the card is too small for that image size
        assert "too small" in str(e) and "smaller image size" in str(e)
        assert free < 8 and max_pixels > 1_048_576
        return
    used = residency.peak_bytes + FLUX_OTHER_WEIGHTS.always
    assert used <= plan.budget_gib * GIB  # and budget_gib is what the device budget left
    assert plan.budget_gib == plan.device_budget.allocator_gib < free
    side = reserve_side(max_pixels)
    assert residency.reserve_bytes == dit_activation_bytes(side, side,
                                                         batch=ModelSection().batch_images)
    assert f"{max_pixels:,} px" in plan.describe() and "vram_limit 7" not in plan.describe()


@settings(max_examples=200, deadline=None)
@given(max_pixels=st.integers(256 * 256, 2048 * 2048), data=st.data())
def test_the_reserve_covers_every_image_shape_the_limits_allow(max_pixels, data):
    """Any width × height within max_pixels (sides multiples of 16) needs no more activation
    or decode memory than the square the plan reserves for."""
    width = data.draw(st.integers(16, max_pixels // 16).map(lambda w: w // 16 * 16 or 16))
    height = max(16, min(max_pixels // width, 8192) // 16 * 16)
    assert width * height <= max_pixels or height == 16
    if width * height > max_pixels:
        return
    side = reserve_side(max_pixels)
    assert dit_activation_bytes(width, height) <= dit_activation_bytes(side, side)
    assert vae_decode_bytes(width, height) <= vae_decode_bytes(side, side)
    assert warm_up_side(max_pixels) ** 2 <= max_pixels
    assert side ** 2 >= max_pixels


def test_larger_cards_keep_more_blocks_resident():
    resident = []
    for free in (5.6, 7.5, 9.5, 11.5, 15.5):
        _, residency = planned_dit(free, 1_048_576)
        resident.append(len(residency.placements) - residency.count("streamed"))
    assert resident == sorted(resident) and resident[0] < resident[-1]


def test_the_log_line_speaks_of_the_card_not_of_the_whole_device():
    plan = plan_memory(ModelSection(), 7.0, 73.0)  # an 80 GB GPU with all but 7.5 GiB taken
    line = plan.describe()
    assert "device budget 7.50 GiB (free at start)" in line
    assert "CUDA context 0.50" in line and "allocator" in line
    assert "78" not in line  # not the 78.7 GiB "vram_limit" of the whole GPU


def test_calibration_excess():
    budget = device_budget(0.0, 7.0)
    assert calibration_excess_gib(budget, 6.0) == 0.0
    over = 7.0 - CALIBRATION_SAFETY_GIB + 0.4
    assert calibration_excess_gib(budget, over) == pytest.approx(0.4)


def test_with_less_records_the_calibration_and_stops_at_the_streamers_least():
    plan = plan_memory(ModelSection(), 7.0, 0.5)
    less = with_less(plan, 0.5, "test")
    assert less.budget_gib == pytest.approx(plan.budget_gib - 0.5)
    assert less.device_budget.calibration_gib == pytest.approx(0.5)
    assert less.device_budget.allocator_gib == pytest.approx(less.budget_gib)
    assert with_less(plan, plan.budget_gib - 1.0, "test") is None


# -- the backend's calibration on a fake card -----------------------------------------------------
torch = pytest.importorskip("torch")
pytest.importorskip("diffsynth")


from engine.flux import backend as flux_backend  # noqa: E402
from engine.flux.backend import FluxBackend  # noqa: E402
from engine.request import ImageRequest  # noqa: E402
from tests.test_flux_builder import FakePipe, fill  # noqa: E402


class FakeCard:
    """A GPU with ``free_gib`` free at start. Each image peaks at 95% of the plan's allocator
    budget plus ``hidden_gib`` that the plan did not foresee (kernels, fragmentation)."""

    def __init__(self, free_gib: float, hidden_gib: float) -> None:
        self.free = int(free_gib * GIB)
        self.hidden = int(hidden_gib * GIB)
        self.peak = 0
        self.images = 0

    def run(self, plan) -> None:
        need = int(plan.budget_gib * GIB * 0.95) + self.hidden
        if need > self.free:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake card)")
        self.peak = max(self.peak, need)
        self.images += 1

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self._reset)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: self.peak)
        monkeypatch.setattr(flux_backend, "_device_memory",
                            lambda t, d: (self.free / GIB, 0.5))
        monkeypatch.setattr(flux_backend, "_allocator_snapshot", lambda t, d: (self.free, 0))

    def _reset(self, *args) -> None:
        self.peak = 0


class CardPipe(FakePipe):
    fail_builds = 0

    def __init__(self, plan, card: FakeCard) -> None:
        super().__init__(plan, None)
        self.card = card

    def __call__(self, **kwargs):
        self.card.run(self.plan)
        return super().__call__(**kwargs)


def card_backend(tmp_path: Path, monkeypatch, card: FakeCard, **model):
    card.install(monkeypatch)
    config = ModelSection(models_dir=str(tmp_path), compile=False, expandable_segments=False,
                          **model)
    fill(tmp_path, config)
    builds: list[CardPipe] = []

    def factory(plan, paths):
        if CardPipe.fail_builds:
            CardPipe.fail_builds -= 1
            raise RuntimeError("loading failed (simulated)")
        builds.append(CardPipe(plan, card))
        return builds[-1]

    return FluxBackend(config, pipeline_factory=factory), builds


REQUEST = ImageRequest(prompt="fox", seed=1, steps=3, width=1024, height=1024, guidance=3.5)


def test_a_warm_up_that_runs_out_of_memory_tightens_the_plan_instead_of_exiting(
        tmp_path, monkeypatch):
    card = FakeCard(free_gib=7.5, hidden_gib=2.0)  # what the 8 GB card did before
    backend, builds = card_backend(tmp_path, monkeypatch, card)
    backend.load()
    first, last = builds[0].plan, backend.plan
    assert last.budget_gib < first.budget_gib and last.device_budget.calibration_gib > 0
    assert backend.calibration[0] == "warm-up ran out of memory"
    assert backend.calibration[-1].startswith("peak")
    assert card.peak + CALIBRATION_SAFETY_GIB * GIB <= card.free
    backend.generate(REQUEST, lambda i, n: None)  # and it makes images


def test_a_warm_up_over_the_configured_budget_tightens_by_what_it_measured(
        tmp_path, monkeypatch):
    card = FakeCard(free_gib=70.0, hidden_gib=1.5)  # a big GPU: no OOM to catch it
    backend, builds = card_backend(tmp_path, monkeypatch, card, vram_limit_gib=8.0)
    backend.load()
    assert len(builds) == 2 and "over" in backend.calibration[0]
    grown = card.peak / GIB
    assert grown + CALIBRATION_SAFETY_GIB <= 8.0 - 0.5 + 1e-9  # the budget less the context
    excess = float(backend.calibration[0].split(", ")[1].split()[0])
    assert backend.plan.device_budget.calibration_gib == pytest.approx(excess + 0.1, abs=0.006)


def test_a_card_too_small_for_the_model_says_so(tmp_path, monkeypatch):
    card = FakeCard(free_gib=3.0, hidden_gib=3.0)
    backend, _ = card_backend(tmp_path, monkeypatch, card)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="does not fit this GPU"):
        backend.load()


def test_a_failed_replan_rolls_back_then_tries_the_next_plan_down(tmp_path, monkeypatch):
    card = FakeCard(free_gib=60.0, hidden_gib=0.0)
    backend, builds = card_backend(tmp_path, monkeypatch, card, preset="max")
    backend.load()
    old = backend.plan
    CardPipe.fail_builds = 1  # the first tighter plan's load fails
    try:
        assert backend.reduce_memory() is True
    finally:
        CardPipe.fail_builds = 0
    # the old plan was loaded again, then the next one down was applied
    assert [b.plan.preset for b in builds] == ["max", "max", "balanced"]
    assert backend.plan is builds[-1].plan and backend.plan.budget_gib < old.budget_gib
    backend.generate(REQUEST, lambda i, n: None)


def test_when_no_tighter_plan_applies_the_old_one_stays_in_force(tmp_path, monkeypatch):
    card = FakeCard(free_gib=60.0, hidden_gib=0.0)
    backend, builds = card_backend(tmp_path, monkeypatch, card, preset="max")
    backend.load()
    old = backend.plan
    real_build = backend._build

    def build_only_max():
        if backend.plan.preset != "max":
            raise RuntimeError("loading failed (simulated)")
        real_build()

    monkeypatch.setattr(backend, "_build", build_only_max)
    assert backend.reduce_memory() is False
    assert backend.plan == old and builds[-1].plan == old
    backend.generate(REQUEST, lambda i, n: None)


def test_a_pipeline_that_could_not_be_loaded_again_is_loaded_by_the_next_image(
        tmp_path, monkeypatch):
    card = FakeCard(free_gib=60.0, hidden_gib=0.0)
    backend, builds = card_backend(tmp_path, monkeypatch, card, preset="max")
    backend.load()
    CardPipe.fail_builds = 10  # every load fails: the tighter ones and the old one
    try:
        assert backend.reduce_memory() is False
        assert backend._pipe is None
        with pytest.raises(RuntimeError, match="could not be loaded again"):
            backend.generate(REQUEST, lambda i, n: None)
    finally:
        CardPipe.fail_builds = 0
    backend.generate(REQUEST, lambda i, n: None)  # the platform recovered: it loads again
    assert backend._pipe is not None and builds[-1].plan == backend.plan


def test_the_failed_pass_is_gone_before_the_replan(tmp_path, monkeypatch):
    """The worker re-plans outside its except block: nothing the failed pass held survives."""
    from engine.worker import GpuWorker

    class Holder:
        pass

    seen: dict[str, bool] = {}

    class Backend:
        model_name = "test"
        calls = 0

        def generate(self, request, on_step):
            self.calls += 1
            if self.calls == 1:
                big = Holder()  # stands for the failed pass's activations
                self.ref = weakref.ref(big)
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return "image"

        def reduce_memory(self):
            gc.collect()
            seen["alive"] = self.ref() is not None
            return True

    import threading

    worker = GpuWorker(Backend())  # type: ignore[arg-type]
    image = worker.generate_blocking(REQUEST, lambda i, n: None, threading.Event(), math.inf)
    assert image == "image" and seen == {"alive": False}


@pytest.mark.parametrize(("batch_images", "side", "expected"), [
    (1, 1024, 1), (1, 512, 3), (2, 1024, 2), (2, 768, 3), (2, 512, 4), (4, 1024, 4)])
def test_a_pass_holds_what_the_activations_kept_for_the_batch_hold(batch_images, side,
                                                                    expected) -> None:
    """Text tokens count per image, so four 512² images are more than one 1024² one."""
    plan = plan_memory(ModelSection(batch_images=batch_images), 7.5, 0.5)
    assert plan.batch_for(side, side, 4) == expected
    assert plan.batch_for(side, side, 1) == 1
    assert dit_activation_bytes(side, side, batch=expected) <= plan.activation_bytes()


def test_each_image_of_batch_kept_costs_dit_blocks_on_the_gpu() -> None:
    resident = []
    for batch_images in (1, 2, 4):
        plan = plan_memory(ModelSection(batch_images=batch_images), 7.5, 0.5)
        residency = dit_residency(plan, flux_dev_block_sizes(), FLUX_FIXED_BYTES,
                                  FLUX_OTHER_WEIGHTS)
        resident.append(sum(p != "streamed" for p in residency.placements))
        assert f"{batch_images} images" in plan.describe() or batch_images == 1
    assert resident[0] > resident[1] > resident[2]


def test_a_pass_of_four_images_costs_the_card_little_more_than_one() -> None:
    """A job's images wait in each block while one is computed (engine/flux/batch.py): four
    1024² images keep far less room than two computed at once, so more of the DiT stays on the
    card than with ``batch_images = 2``."""
    one, four = (plan_memory(ModelSection(), 7.5, 0.5, max_images=n) for n in (1, 4))
    extra = four.activation_bytes() - one.activation_bytes()
    assert 0 < extra < dit_activation_bytes(1024, 1024) / 3  # three waiting: a third of one
    assert "one image at a time in passes of up to 4" in four.describe()
    both = plan_memory(ModelSection(batch_images=2), 7.5, 0.5, max_images=4)
    resident = [sum(p != "streamed" for p in dit_residency(
        plan, flux_dev_block_sizes(), FLUX_FIXED_BYTES, FLUX_OTHER_WEIGHTS).placements)
        for plan in (four, both)]
    assert resident[0] > resident[1]


@pytest.mark.parametrize("free", [5.6, 7.5, 9.5, 11.5])  # the cards that stream
def test_parked_models_give_the_denoising_loop_their_room(free):
    """CLIP, T5's embedding and the VAE parked (engine/flux/parking.py): the DiT keeps more
    blocks on the GPU and streams less per step than with them resident throughout, and every
    phase still fits: the loop with its buffers, the text encoders and the VAE with their
    weights fetched."""
    plan = plan_memory(ModelSection(), free, 0.5)
    resident = dataclasses.replace(FLUX_OTHER_WEIGHTS, parked=False)
    kept, parked = (dit_residency(plan, flux_dev_block_sizes(), FLUX_FIXED_BYTES, others)
                    for others in (resident, FLUX_OTHER_WEIGHTS))
    # the loop gains their room up to where the text encoders' phase (T5's buffers with CLIP
    # and T5's embedding fetched) becomes the larger: at least 0.25 GiB less a step
    assert kept.streamed_bytes - parked.streamed_bytes >= GIB // 4
    budget = plan.budget_gib * GIB
    weights = parked.fixed_bytes + parked.resident_bytes
    side = plan.reserve_side
    assert weights + parked.buffer_bytes + parked.reserve_bytes <= budget  # the loop
    assert weights + t5_phase_bytes() + FLUX_OTHER_WEIGHTS.text <= budget  # text encoders
    vae = vae_decode_bytes(side, side, tiled=plan.vae_tiled)
    assert weights + vae + FLUX_OTHER_WEIGHTS.decode <= budget  # the decode
    assert kept.peak_bytes + FLUX_OTHER_WEIGHTS.total <= budget


def test_other_weights_by_phase():
    others = OtherWeights(text=500, encode=60, decode=90)
    assert others.always == 0 and others.total == 650
    assert others.phase_bytes(vae_bytes=1000, t5_bytes=100) == 1090  # the decode's
    assert others.phase_bytes(vae_bytes=100, t5_bytes=1000) == 1500  # the text encoders'
    resident = dataclasses.replace(others, parked=False, resident=7)
    assert resident.always == 657 and resident.phase_bytes(1000, 100) == 1000


def test_the_constants_are_flux_dev_s_files():
    """FLUX_OTHER_WEIGHTS is the real files' layout in bf16 (bench/make_random_flux.py)."""
    from bench import make_random_flux as mrf

    layout = mrf.flux_layout()
    size = lambda shapes, keep: 2 * sum(mrf._numel(s) for k, s in shapes.items() if keep(k, s))  # noqa: E731
    t5 = {k: s for name, shapes in layout.items() if name.startswith("text_encoder_2/")
          for k, s in shapes.items()}
    text = (size(layout[mrf.CLIP_FILE], lambda k, s: True)
            + size(t5, lambda k, s: not (k.startswith("encoder.block.") and len(s) >= 2)))
    vae = layout[mrf.VAE_FILE]
    for expected, actual in ((text, FLUX_OTHER_WEIGHTS.text),
                             (size(vae, lambda k, s: k.startswith("encoder.")),
                              FLUX_OTHER_WEIGHTS.encode),
                             (size(vae, lambda k, s: k.startswith("decoder.")),
                              FLUX_OTHER_WEIGHTS.decode)):
        assert expected <= actual < expected + 2**20


@pytest.mark.parametrize(("park", "cast", "float8", "streamed_gib"),
                         [(False, False, False, 6.96), (True, False, False, 6.25),
                          (False, True, False, 6.46), (True, True, False, 5.83),
                          (True, True, True, 5.93)])
def test_doctor_s_plan_follows_park_models_and_layer_cast(park, cast, float8, streamed_gib):
    """An 8 GB card (7.5 GiB free), --n up to 4: what each switch gives the DiT, as doctor
    reports it (the same arithmetic the backend lays the DiT out with). With float8 matmuls
    each layer's quantized input (5 bytes a value) takes more room than its cast weight, so
    0.1 GiB more is streamed; the step is faster all the same (docs/benchmarks.md)."""
    from engine.flux.plan_report import plan_report

    model = ModelSection(park_models=park, layer_cast=cast, float8_compute=float8)
    report = plan_report(model, 1024 * 1024, "NVIDIA H100", 7.5, 0.5, max_images=4)
    assert report.plan.park_models is park and report.plan.layer_cast is cast
    assert report.plan.float8_matmul is (float8 and cast)
    assert round(report.streamed_gib_per_step, 2) == streamed_gib
