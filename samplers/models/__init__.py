"""Flow model adapters: one thin file per model family.

`load_model(spec)` is the one entry point: "shapesworld" (the built-in image toy),
"shapesworld_video" (the built-in video toy), a local diffusers-layout folder, or a hub id. The
family is read from `model_index.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .sd3 import SD3Adapter, SD3Cond
from .wan import WanAdapter, WanCond

FAMILIES = {"StableDiffusion3Pipeline": SD3Adapter, "WanPipeline": WanAdapter}
# pipeline class (model_index.json's _class_name) -> "module:Adapter", imported on first use
LAZY_FAMILIES = {
    "WanImageToVideoPipeline": "wan:WanAdapter",
    "FluxPipeline": "flux:FluxAdapter",
    "FluxKontextPipeline": "flux:FluxKontextAdapter",
    "QwenImagePipeline": "qwen_image:QwenImageAdapter",
    "QwenImageEditPipeline": "qwen_image:QwenImageEditAdapter",
    "QwenImageEditPlusPipeline": "qwen_image:QwenImageEditPlusAdapter",
    "ZImagePipeline": "z_image:ZImageAdapter",
    "HunyuanVideoPipeline": "hunyuan_video:HunyuanVideoAdapter",
    "Flux2Pipeline": "flux2:Flux2Adapter",
    "Flux2KleinPipeline": "flux2:Flux2KleinAdapter",
}


def family_adapter(pipeline_class: str):
    """The adapter class for a diffusers pipeline class name; a clear error for any other."""
    if pipeline_class in FAMILIES:
        return FAMILIES[pipeline_class]
    if pipeline_class not in LAZY_FAMILIES:
        raise ValueError(f"unsupported pipeline class {pipeline_class!r}; supported: "
                         f"{sorted([*FAMILIES, *LAZY_FAMILIES])}")
    import importlib

    module, name = LAZY_FAMILIES[pipeline_class].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def load_model(spec: str | Path = "shapesworld", device="cpu", **kwargs):
    """Loads a flow model adapter from "shapesworld", "shapesworld_video", a local folder or a hub id."""
    if str(spec) == "shapesworld":
        from .shapesworld import load_shapesworld

        return load_shapesworld(device=device, **kwargs)
    if str(spec) == "shapesworld_video":
        from .shapesworld_video import load_shapesworld_video

        return load_shapesworld_video(device=device, **kwargs)
    root = Path(spec)
    if root.is_dir():
        index = root / "model_index.json"
        if index.is_file():
            name = json.loads(index.read_text()).get("_class_name", "")
            try:
                adapter = family_adapter(name)
            except ValueError as error:
                raise ValueError(f"{root}: {error}") from None
            return adapter.from_pretrained(root, device=device, **kwargs)
        if (root / "transformer").is_dir():  # saved by genalign without model_index.json
            return SD3Adapter.from_pretrained(root, device=device, **kwargs)
        raise FileNotFoundError(f"{root} is not a diffusers model folder (no model_index.json)")
    name = _hub_pipeline_class(str(spec))
    adapter = SD3Adapter if name is None else family_adapter(name)
    return adapter.from_pretrained(str(spec), device=device, **kwargs)


def _hub_pipeline_class(repo_id: str) -> str | None:
    """`_class_name` of a hub repo's model_index.json (from the hub or its local cache); None when
    it cannot be read (then the SD3 adapter reports what is missing, as before)."""
    if str(repo_id).startswith((".", "/", "~")) or str(repo_id).count("/") != 1:
        return None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(repo_id, "model_index.json")).read_text()).get("_class_name")
    except Exception:  # offline without a cached copy, no such repo, gated: fall back
        return None


__all__ = ["SD3Adapter", "SD3Cond", "load_model", "FAMILIES", "LAZY_FAMILIES", "family_adapter"]
