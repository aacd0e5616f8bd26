"""A base for adapters that wrap one diffusers pipeline's components (FLUX.1, Wan2.2, Qwen-Image, ...).

The family module says which pipeline it mirrors (`pipeline_class_name`) and which components it
keeps (`component_names`); this base gives it what is the same for every family:

- `from_pretrained(folder or hub id)` through the pipeline's own `from_pretrained` (so every
  component, tokenizer and scheduler class is the one `model_index.json` names), and
  `save_pretrained` through the pipeline's `save_pretrained` (a folder diffusers itself loads),
  plus the adapter settings (`genalign.json`: sampler defaults, sequence lengths, sizes);
- `pipeline()`: the diffusers pipeline built on the adapter's own modules (shared weights,
  LoRA included), the reference every adapter is tested against;
- `sigmas(num_steps, ...)`: the schedule the pipeline's scheduler sets for that call, computed by
  the scheduler itself (samplers.schedules.scheduler_sigmas), so it equals the pipeline's bit for bit;
- LoRA through peft, saved with the pipeline's `save_lora_weights` (common.LoraAdapterMixin).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from samplers.schedules import scheduler_sigmas

from .common import LoraAdapterMixin

ADAPTER_SETTINGS_FILE = "genalign.json"


def as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("encode_prompt got an empty prompt list")
    return prompts


def negatives_for(negative_prompt: str | Sequence[str], n: int) -> list[str]:
    negatives = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != n:
        raise ValueError(f"got {len(negatives)} negative prompts for {n} prompts")
    return negatives


class PipelineAdapter(LoraAdapterMixin, torch.nn.Module):
    """Holds a diffusers pipeline's components as attributes (modules are registered submodules).

    Subclasses set `family`, `pipeline_class_name`, `component_names`, `default_lora_targets`,
    `base_defaults` (sampler settings: num_steps, guidance, ...) and implement encode_prompt,
    velocity, latent_shape, decode, encode.
    """

    family = "pipeline"
    pipeline_class_name = ""
    component_names: tuple[str, ...] = ()
    base_defaults: dict[str, Any] = {}
    settings_keys: tuple[str, ...] = ("max_sequence_length",)  # saved in genalign.json

    def __init__(self, components: dict[str, Any], defaults: dict | None = None, **settings):
        super().__init__()
        missing = [name for name in ("transformer", "vae", "scheduler") if components.get(name) is None]
        if missing:
            raise ValueError(f"{type(self).__name__} needs the components {missing}")
        unknown = sorted(set(components) - set(self.component_names))
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown components {unknown}; known: {self.component_names}")
        for name in self.component_names:
            setattr(self, name, components.get(name))
        for key, value in settings.items():
            if key not in self.settings_keys:
                raise ValueError(f"{type(self).__name__}: unknown setting {key!r}; known: {self.settings_keys}")
            setattr(self, key, value)
        self.defaults = {**self.base_defaults, **(defaults or {})}

    # ------------------------------------------------------------------ diffusers
    @classmethod
    def pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def lora_pipeline(cls):
        return cls.pipeline_class()

    def pipeline(self):
        """The diffusers pipeline on this adapter's modules (weights shared, not copied)."""
        pipe = self.pipeline_class()(**{name: getattr(self, name) for name in self.component_names})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell of an image VAE with one downsampling per block but the last."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """The default image side in px (defaults["resolution"])."""
        return int(self.defaults["resolution"])

    def image_hw(self, height: int | None, width: int | None, multiple: int) -> tuple[int, int]:
        """(height, width) of a request (default: the square default size), checked to divide by `multiple`."""
        height = height or self.image_size
        width = width or height
        if height % multiple or width % multiple:
            raise ValueError(f"image size {height}x{width} must be divisible by {multiple} for this model")
        return height, width

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def sigmas(self, num_steps: int | None = None, height: int | None = None, width: int | None = None,
               **kwargs) -> torch.Tensor:
        """float32 [S + 1]: the schedule the pipeline's scheduler sets for an image (or video) of
        this size, ending in 0 (families override `_schedule_inputs` for their sigmas / mu)."""
        num_steps = num_steps or self.defaults["num_steps"]
        custom, mu = self._schedule_inputs(num_steps, height, width, **kwargs)
        return scheduler_sigmas(self.scheduler, num_steps, sigmas=custom, mu=mu)

    def _schedule_inputs(self, num_steps: int, height, width, **kwargs):
        return None, None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pipeline(cls, pipe, defaults: dict | None = None, **settings) -> "PipelineAdapter":
        components = {name: getattr(pipe, name, None) for name in cls.component_names}
        return cls(components, defaults=defaults, **settings)

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, torch_dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", **kwargs) -> "PipelineAdapter":
        """Loads a diffusers-layout folder or hub id with the family's pipeline class; a
        `genalign.json` beside `model_index.json` may hold sampler `defaults` and settings."""
        root = Path(path_or_id)
        if not root.exists() and (str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1):
            raise FileNotFoundError(f"model path not found: {path_or_id}")
        settings = {}
        if (root / ADAPTER_SETTINGS_FILE).is_file():
            settings = json.loads((root / ADAPTER_SETTINGS_FILE).read_text())
        pipe = cls.pipeline_class().from_pretrained(str(path_or_id), torch_dtype=torch_dtype, **kwargs)
        defaults = settings.pop("defaults", None)
        references = settings.pop("reference_images", None)
        settings = {k: v for k, v in settings.items() if k in cls.settings_keys}
        model = cls.from_pipeline(pipe, defaults=defaults, **settings)
        if references is not None:  # editing models: {prompt: image} pairs for the trainers
            from .image_cond import ImageConditioning, read_reference_images

            if not isinstance(model, ImageConditioning):
                raise ValueError(f"{root / ADAPTER_SETTINGS_FILE}: reference_images given, but "
                                 f"{cls.pipeline_class_name} takes no input image")
            file = Path(references)
            model.reference_images = read_reference_images(file if file.is_absolute() else root / file)
        return model.to(device).eval().requires_grad_(False)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Writes the pipeline folder diffusers loads (`model_index.json` + components) and the
        adapter settings (`genalign.json`)."""
        root = Path(directory)
        self.pipeline().save_pretrained(str(root))
        settings = {"defaults": self.defaults, **{k: getattr(self, k) for k in self.settings_keys}}
        (root / ADAPTER_SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        return root
