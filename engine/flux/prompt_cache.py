"""Text embeddings of the prompts seen last, so a prompt is encoded once.

A chat re-rolls, varies and upscales the same prompt again and again, an upscale samples
every tile with it, and a large ``--n`` job runs in several passes: each of those calls
diffsynth's prompt unit again, which runs CLIP and T5-XXL. On a card that streams T5 that is
4.7 GB of float8 weights over PCIe per call (about 0.09 s on an H100's link, about twice
that on a PCIe 4.0 consumer card). ``PromptCache.install`` wraps the pipeline's own
``FluxImageUnit_PromptEmbedder.process`` and answers a prompt it has seen with the stored
tensors, kept in host memory (4 MiB a prompt at 512 T5 tokens) so the GPU budget is untouched.

    cache = PromptCache(entries=32)
    cache.install(pipe)      # after every (re)load; the cache is emptied with the weights
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)

UNIT_CLASS = "FluxImageUnit_PromptEmbedder"
OUTPUTS = ("prompt_emb", "pooled_prompt_emb", "text_ids")


class PromptCache:
    """Least-recently-used (prompt, T5 length) -> the prompt unit's outputs, on the CPU."""

    def __init__(self, entries: int) -> None:
        self.entries = max(0, int(entries))
        # each output as (its copy in host memory, the device the pipeline had it on)
        self._stored: OrderedDict[tuple[str, int], dict[str, tuple[Any, Any]]] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._stored)

    def clear(self) -> None:
        """Forget every embedding: the text encoders they came from are gone (a reload may
        hold T5 in another precision)."""
        self._stored.clear()

    def install(self, pipe: Any) -> bool:
        """Wrap ``pipe``'s prompt unit (a fresh pipeline's: call after each load). False when
        the cache is off or the pipeline has no such unit (a test's fake)."""
        self.clear()
        unit = next((u for u in getattr(pipe, "units", ())
                     if type(u).__name__ == UNIT_CLASS), None)
        if self.entries == 0 or unit is None:
            return False
        encode = type(unit).process

        def process(pipe: Any, prompt: str, t5_sequence_length: int, positive: bool) -> dict:
            key = (prompt, int(t5_sequence_length))
            stored = self._stored.get(key)
            if stored is not None:
                self._stored.move_to_end(key)
                self.hits += 1
                log.debug("prompt embeddings reused (%d reused, %d encoded so far)", self.hits,
                          self.misses)
                # copies: the job may change its inputs in place
                return {name: value.to(device, copy=True)
                        for name, (value, device) in stored.items()}
            out = encode(unit, pipe, prompt, t5_sequence_length, positive)
            self.misses += 1
            if set(OUTPUTS) <= set(out):  # the encoders ran (diffsynth returns {} without them)
                self._keep(key, out)
            return out

        unit.process = process
        return True

    def _keep(self, key: tuple[str, int], out: dict[str, Any]) -> None:
        self._stored[key] = {name: (out[name].detach().to("cpu", copy=True),
                                   out[name].device)
                             for name in OUTPUTS}
        while len(self._stored) > self.entries:
            self._stored.popitem(last=False)
