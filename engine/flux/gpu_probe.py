"""What the doctor and the ``auto`` preset need to know about the GPU, without loading a model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuStatus:
    available: bool
    name: str = ""
    free_gib: float = 0.0
    total_gib: float = 0.0
    torch_version: str = ""
    problem: str = ""  # why no GPU can be used, in words
    float8_problem: str | None = None  # why it runs no float8 matmuls (None: it does)


def probe_gpu(device: str = "cuda") -> GpuStatus:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        return GpuStatus(False, problem=f"PyTorch is not installed ({exc})")
    version = torch.__version__
    if not device.startswith("cuda"):
        return GpuStatus(False, torch_version=version, problem=f"model.device is {device!r}")
    if not torch.cuda.is_available():
        why = ("this PyTorch build has no CUDA" if torch.version.cuda is None
               else "no CUDA GPU is visible (driver missing, or CUDA_VISIBLE_DEVICES hides it)")
        return GpuStatus(False, torch_version=version, problem=why)
    index = torch.device(device).index or 0
    free, total = torch.cuda.mem_get_info(index)
    from engine.flux.float8_compute import check_float8_matmul

    return GpuStatus(True, name=torch.cuda.get_device_name(index), free_gib=free / 2**30,
                     total_gib=total / 2**30, torch_version=version,
                     float8_problem=check_float8_matmul(f"cuda:{index}"))
