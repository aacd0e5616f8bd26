"""`align sample`: generate images or videos from a flow model (the built-in ShapesWorld model by default)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from samplers.steps import STEPS

from .config import doc, register_config

SAMPLER_NAMES = tuple(STEPS)
VIDEO_FPS = 4.0  # frame rate written into sampled .mp4 files
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@register_config("sample")
@dataclass
class SampleConfig:
    """How to sample: which model, which sampler and its settings."""

    model: str = doc("shapesworld", "'shapesworld' (built-in), a local diffusers folder or a hub id.")
    lora: str | None = doc(None, "Optional LoRA (folder or .safetensors) to load into the transformer.")
    num_steps: int | None = doc(None, "Denoising steps (default: the checkpoint's, 10 for ShapesWorld).")
    guidance: float | None = doc(None, "CFG scale; 1 disables CFG (default: the checkpoint's, 4.5 for ShapesWorld).")
    shift: float | None = doc(None, "Timestep shift of the sigma schedule (default: the checkpoint's, 3.0).")
    sampler: str = doc("ode", f"Step function: one of {', '.join(SAMPLER_NAMES)}.")
    step_params: dict = doc({}, "Parameters of the stochastic step, e.g. {noise_level: 0.7} or {eta: 0.3}.")
    negative_prompt: str = doc("", "Negative prompt for CFG.")
    batch_size: int = doc(64, "Images per forward batch.")
    device: str = doc("cpu", "torch device, e.g. cpu or cuda.")
    dtype: str = doc("fp32", "Model weights dtype: fp32, bf16 or fp16 (half precision needs CUDA).")

    def __post_init__(self):
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"sampler must be one of {SAMPLER_NAMES}, got {self.sampler!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError("num_steps must be >= 1")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """Half precision only on CUDA: on a CPU it is slower and fp16 kernels are missing, so fall back."""
    if name != "fp32" and not str(device).startswith("cuda"):
        import warnings

        warnings.warn(f"dtype {name} needs CUDA; using fp32 on {device}", stacklevel=2)
        return torch.float32
    return DTYPES[name]


def load_sampling_model(cfg: SampleConfig):
    from samplers.models import load_model
    from samplers.progress import status

    dtype = resolve_dtype(cfg.dtype, cfg.device)
    status(f"loading model {cfg.model} on {cfg.device} ...")
    model = load_model(cfg.model, device=cfg.device, torch_dtype=dtype)
    if cfg.lora:
        status(f"loading LoRA {cfg.lora} ...")
        model.load_lora(cfg.lora)
    return model


def read_prompt_file(path: str | Path) -> list[dict]:
    """Prompts from a .txt (one per line) or .jsonl file (GenEval metadata with `prompt`, or
    DenseAlignBench-style `caption`). Returns dicts with `prompt` and, when present, `meta`."""
    from eval.score import read_jsonl

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if path.suffix == ".jsonl":
        items = []
        for number, row in enumerate(read_jsonl(path), start=1):
            text = row.get("prompt", row.get("caption"))
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{number}: no 'prompt' or 'caption' string")
            items.append({"prompt": text, **({"meta": row} if "include" in row else {})})
    else:
        items = [{"prompt": line.strip()} for line in path.read_text().splitlines() if line.strip()]
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


def shapesworld_prompts(split: str, per_tag: int | None = None) -> list[dict]:
    """ShapesWorld prompts of `split` with their metadata; with `per_tag`, exactly that many items
    per category (prompts cycled within the category), so every category is measured alike."""
    from eval.shapes import TAGS, prompts

    metas = prompts(split)
    if per_tag is not None:
        if per_tag < 1:
            raise ValueError(f"--per-tag must be >= 1, got {per_tag}")
        by_tag = {tag: [m for m in metas if m["tag"] == tag] for tag in TAGS}
        metas = [by_tag[tag][i % len(by_tag[tag])] for tag in TAGS for i in range(per_tag)]
    return [{"prompt": m["prompt"], "meta": m} for m in metas]


def shapesworld_video_prompts(split: str, per_tag: int) -> list[dict]:
    """ShapesWorld-Video prompts of `split`, exactly `per_tag` per category (cycled within it)."""
    from eval.shapes_video import VIDEO_TAGS, video_prompts

    if per_tag < 1:
        raise ValueError(f"per_tag must be >= 1, got {per_tag}")
    by_tag = {tag: [m for m in video_prompts(split) if m["tag"] == tag] for tag in VIDEO_TAGS}
    return [{"prompt": by_tag[tag][i % len(by_tag[tag])]["prompt"], "meta": by_tag[tag][i % len(by_tag[tag])]}
            for tag in VIDEO_TAGS for i in range(per_tag)]


def sample_to(cfg: SampleConfig, items: list[dict], num: int, seed: int, out: Path, progress=None,
              model=None) -> Path:
    """Samples `num` images (or videos) cycling through `items`; writes a captioned grid (.png
    `out`; videos as filmstrips) or a folder of PNGs (videos: lossless H.264 .mp4, readable by
    `align score`) plus samples.jsonl (file, prompt, seed, meta per sample). model: the
    adapter to sample (default: `load_sampling_model(cfg)`)."""
    from PIL import Image

    from eval.grid import save_caption_grid, to_uint8_images, to_uint8_videos
    from rewards.video_io import write_video
    from samplers.generate import generate

    if not items:
        raise ValueError("empty prompt list")
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    chosen = [items[i % len(items)] for i in range(num)]
    seeds = [seed + i for i in range(num)]
    model = model if model is not None else load_sampling_model(cfg)
    images = generate(model, [c["prompt"] for c in chosen], seeds, num_steps=cfg.num_steps, guidance=cfg.guidance,
                      shift=cfg.shift, sampler=cfg.sampler, step_params=cfg.step_params or None,
                      negative_prompt=cfg.negative_prompt, batch_size=cfg.batch_size, progress=progress)
    out = Path(out)
    if out.suffix.lower() == ".png":
        return save_caption_grid(images, [c["prompt"] for c in chosen], out)
    out.mkdir(parents=True, exist_ok=True)
    video = images.ndim == 5
    lines = []
    for i, (array, item, s) in enumerate(zip(to_uint8_videos(images) if video else to_uint8_images(images),
                                             chosen, seeds)):
        if video:
            name = f"{i:05d}.mp4"
            write_video(out / name, array, fps=VIDEO_FPS, quality=0)
        else:
            name = f"{i:05d}.png"
            Image.fromarray(array).save(out / name)
        lines.append(json.dumps({"file": name, "prompt": item["prompt"], "seed": s,
                                 **({"meta": item["meta"]} if "meta" in item else {})}))
    tmp = out / "samples.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "samples.jsonl")
    return out
