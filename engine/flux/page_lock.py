"""Page-lock host tensors in place, so that copies to the GPU run at the link's full speed and
overlap with compute (``non_blocking=True``).

``cudaHostRegister`` locks the pages a tensor already has: unlike ``pin_memory()`` it makes no
second copy and does not round the size up to a power of two (torch's pinned allocator would
give a 4.3 GiB buffer 8 GiB). Used by the block streamer (``streaming.py``) and by the models
parked between their phases (``parking.py``).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def register_host(t: torch.Tensor) -> bool:
    """Page-lock ``t``'s memory; False (logged) where the driver refuses."""
    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0))
    if err != 0:
        log.warning("cudaHostRegister failed (error %d): copying from pageable memory, "
                    "copies will not overlap compute", err)
        return False
    return True


def unregister_host(t: torch.Tensor) -> None:
    """Undo ``register_host``; the tensor stays valid as ordinary (pageable) memory."""
    err = int(torch.cuda.cudart().cudaHostUnregister(t.data_ptr()))
    if err != 0:
        log.warning("cudaHostUnregister failed (error %d)", err)
