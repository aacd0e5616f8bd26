"""The one image-conditioning path: a reference image (editing) or a first frame (image-to-video) in.

Editing and image-to-video adapters (FLUX.1 Kontext, Qwen-Image-Edit, Wan image-to-video) take
the conditioning image the same way:

    cond = model.encode_prompt(prompts, images=images)   # images: one per prompt, or one for all

where an image is a float tensor in [0, 1] ([3, H, W] or [B, 3, H, W]), a PIL image or a file
path. Trainers pass prompts only, so an adapter may also carry `reference_images`, a mapping
from prompt text to image (key "*" = the image for any other prompt); `encode_prompt` without
`images` looks each prompt up there. A checkpoint's `genalign.json` may name a JSONL file
of {"prompt", "image"} lines as its `"reference_images"` (read_reference_images), so a trainer
config that names the model folder trains the editing model on those pairs. `condition_images` resolves both into one [B, 3, H, W]
batch; each family then turns it into its own conditioning (VAE latents, vision-language tokens,
a first latent frame) inside its `encode_prompt`, so the cond a trainer indexes and repeats
already holds everything the velocity needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

ANY_PROMPT = "*"


def to_image_tensor(image: Any) -> torch.Tensor:
    """One image -> float32 [3, H, W] in [0, 1] (tensor [3, H, W] / [1, 3, H, W], PIL image, path)."""
    if isinstance(image, (str, Path)):
        from PIL import Image

        image = Image.open(image)
    if not isinstance(image, torch.Tensor):
        import numpy as np

        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
        image = torch.from_numpy(array).permute(2, 0, 1)
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"a conditioning image must be [3, H, W] in [0, 1], got shape {tuple(image.shape)}")
    return image.float()


def resize_images(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, 3, h, w] -> [B, 3, height, width] (bilinear with antialiasing; unchanged if equal)."""
    if images.shape[-2:] == (height, width):
        return images
    return torch.nn.functional.interpolate(images, size=(height, width), mode="bilinear", antialias=True,
                                           align_corners=False).clamp(0, 1)


def image_batch(images: Any, batch_size: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Images for `batch_size` prompts -> float32 [B, 3, H, W] in [0, 1].

    `images`: one image (used for every prompt), a list of `batch_size` images, or a tensor
    [B, 3, H, W]. All are resized to `height` x `width` when given (else to the first's size).
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[0] > 1:
        items = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    if len(items) == 1:
        items = items * batch_size
    if len(items) != batch_size:
        raise ValueError(f"got {len(items)} conditioning images for {batch_size} prompts")
    tensors = [to_image_tensor(item) for item in items]
    height, width = height or tensors[0].shape[1], width or tensors[0].shape[2]
    return torch.cat([resize_images(t[None], height, width) for t in tensors])


def read_reference_images(path: str | Path) -> dict[str, str]:
    """{prompt: image path} from a JSONL file of {"prompt": ..., "image": ...} lines (relative image
    paths are taken from the file's folder), the `reference_images` a trainer's prompts look up."""
    import json

    path = Path(path)
    table = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if "prompt" not in item or "image" not in item:
            raise ValueError(f"{path}:{number}: a reference line needs 'prompt' and 'image', got {sorted(item)}")
        image = Path(item["image"])
        table[item["prompt"]] = str(image if image.is_absolute() else path.parent / image)
    return table


class ImageConditioning:
    """Mixin for adapters with an image input: resolves `images` / `reference_images`."""

    reference_images: dict[str, Any] | None = None
    image_required: bool = False  # editing models that cannot run without an image (Qwen-Image-Edit)

    def condition_images(self, prompts: Sequence[str], images: Any = None, height: int | None = None,
                         width: int | None = None) -> torch.Tensor | None:
        """[B, 3, H, W] in [0, 1] for `prompts`, from `images` or the `reference_images` lookup;
        None when neither gives one (text-only use of the model)."""
        if images is None and self.reference_images:
            table = self.reference_images
            missing = [p for p in prompts if p not in table and ANY_PROMPT not in table]
            if missing:
                raise KeyError(f"no reference image for prompt {missing[0]!r} (reference_images has "
                               f"{len(table)} entries and no '*' default)")
            images = [table.get(p, table.get(ANY_PROMPT)) for p in prompts]
        if images is None:
            if self.image_required:
                raise ValueError(f"{type(self).__name__} edits an input image: pass images= to encode_prompt "
                                 "or set model.reference_images")
            return None
        return image_batch(images, len(prompts), height, width)
