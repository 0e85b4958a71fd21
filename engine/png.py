"""PNG output with the generation parameters in a ``parameters`` text chunk.

The chunk follows the AUTOMATIC1111 convention that other Stable Diffusion tools read:
the prompt on the first line, then ``Key: value`` pairs separated by ", ".
"""

from __future__ import annotations

import io

from PIL import Image, PngImagePlugin

from engine.request import ImageRequest
from engine.styles import LoraTag

SAMPLER = "FlowMatch Euler"


def parameters_text(request: ImageRequest, model_name: str, lora: LoraTag | None = None) -> str:
    pairs = [
        ("Steps", str(request.steps)),
        ("Sampler", SAMPLER),
        ("CFG scale", "1"),
        ("Distilled CFG Scale", f"{request.guidance:g}"),
        ("Seed", str(request.seed)),
        ("Size", f"{request.width}x{request.height}"),
        ("Model", model_name.replace(",", " ")),
    ]
    if request.init_image:  # image-to-image, as AUTOMATIC1111 writes it
        pairs.append(("Denoising strength", f"{request.strength:g}"))
    if request.upscale_tile:
        pairs.append(("Upscale", "2"))
    if request.derived_from:  # e.g. "upscale 2× of 1a2b3c4d #2": which image it came from
        pairs.append(("Source", request.derived_from.english().replace(",", " ")))
    prompt = request.prompt.replace("\n", " ")
    if lora is not None:  # as AUTOMATIC1111 writes a LoRA: in the prompt, and its file's hash
        prompt += " " + lora.prompt_tag
        if lora.hash:
            pairs.append(("Lora hashes", f'"{lora.name}: {lora.hash}"'))
    return prompt + "\n" + ", ".join(f"{k}: {v}" for k, v in pairs)


def encode_png(image: Image.Image, request: ImageRequest, model_name: str,
               lora: LoraTag | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", parameters_text(request, model_name, lora))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=6)
    return buffer.getvalue()


def read_parameters(png: bytes) -> dict[str, str]:
    """Parse the ``parameters`` chunk back: ``{"prompt": ..., "Seed": ..., ...}``."""
    with Image.open(io.BytesIO(png)) as image:
        text = image.info.get("parameters") or image.text.get("parameters")  # type: ignore[attr-defined]
    if not text:
        return {}
    prompt, _, tail = text.rpartition("\n")
    fields: dict[str, str] = {"prompt": prompt}
    for part in tail.split(", "):
        key, sep, value = part.partition(": ")
        if sep:
            fields[key] = value
    return fields
