"""Pieces every model adapter shares: batched conditioning containers and peft LoRA handling.

`BatchedCond` gives a dataclass of per-sample tensors (dim 0 = batch, None allowed) the
operations trainers use on a family's Cond (`index`, `repeat_interleave`, `to`, `cat`, `len`).
`LoraAdapterMixin` gives an adapter with a `transformer` the peft LoRA calls, saving and loading
through the family's diffusers pipeline class so the files are the ones diffusers reads.
"""

from __future__ import annotations

import contextlib
from dataclasses import fields, replace
from pathlib import Path
from typing import Sequence

import torch


class BatchedCond:
    """Mixin for a dataclass whose init fields are [B, ...] tensors or None."""

    def _tensors(self):
        return [(f.name, getattr(self, f.name)) for f in fields(self) if f.init]

    def __len__(self) -> int:
        return next(t for _, t in self._tensors() if t is not None).shape[0]

    def _map(self, fn):
        return replace(self, **{name: (None if t is None else fn(t)) for name, t in self._tensors()})

    def index(self, idx):
        """Rows `idx` (slice, index tensor or list) of every tensor."""
        return self._map(lambda t: t[idx])

    def repeat_interleave(self, k: int):
        """Each prompt's conditioning repeated k times in a row (a group of k samples)."""
        return self._map(lambda t: t.repeat_interleave(k, dim=0))

    def to(self, *args, **kwargs):
        return self._map(lambda t: t.to(*args, **kwargs))

    @classmethod
    def cat(cls, conds: Sequence):
        first = conds[0]
        return replace(first, **{name: (None if t is None else torch.cat([getattr(c, name) for c in conds]))
                                 for name, t in first._tensors()})


class LoraAdapterMixin:
    """peft LoRA on `self.transformer`; subclasses set `lora_pipeline` (a diffusers pipeline
    class with `save_lora_weights` / `lora_state_dict`) and `default_lora_targets`."""

    default_lora_targets: tuple[str, ...] = ()

    @staticmethod
    def lora_pipeline():
        raise NotImplementedError

    def add_lora(self, rank: int = 32, alpha: int | None = None, target_modules: Sequence[str] | None = None,
                 dropout: float = 0.0, adapter_name: str = "default") -> None:
        """Attaches a peft LoRA adapter to the transformer (the family's usual targets by default)."""
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, init_lora_weights="gaussian",
                            target_modules=list(target_modules or self.default_lora_targets),
                            lora_dropout=dropout)
        self.transformer.add_adapter(config, adapter_name=adapter_name)

    @contextlib.contextmanager
    def lora_disabled(self):
        """Runs the base model (the Flow-GRPO reference) inside the block."""
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.transformer)

    def save_lora(self, directory: str | Path) -> Path:
        """Writes `pytorch_lora_weights.safetensors` in the layout the family's diffusers pipeline
        (`load_lora_weights`) reads, with the adapter metadata (rank, alpha, targets)."""
        metadata = self.transformer.peft_config["default"].to_dict()
        self.lora_pipeline().save_lora_weights(str(directory), transformer_lora_layers=self.lora_state_dict(),
                                               transformer_lora_adapter_metadata=metadata)
        return Path(directory) / "pytorch_lora_weights.safetensors"

    def load_lora(self, path: str | Path, adapter_name: str = "default") -> None:
        """Loads a LoRA saved by `save_lora` (or any diffusers LoRA of the family: a folder or a
        .safetensors file) into the transformer, with the rank/alpha stored in its metadata."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"LoRA weights not found: {path}")
        folder, weight_name = (path.parent, path.name) if path.is_file() else (path, None)
        state_dict, metadata = self.lora_pipeline().lora_state_dict(str(folder), weight_name=weight_name,
                                                                    return_lora_metadata=True)
        self.transformer.load_lora_adapter(state_dict, prefix="transformer", adapter_name=adapter_name,
                                           metadata=metadata)


class ScaledVAEMixin:
    """decode / encode through an image VAE whose latents are normalised as (z - shift_factor) *
    scaling_factor (SD3, FLUX.1, Z-Image: the pipelines' convention). Needs `self.vae`."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] latents -> images float32 in [0, 1], [B, 3, H, W]."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Images in [0, 1], [B, 3, H, W] -> normalised latents (posterior mode unless `sample`)."""
        cfg = self.vae.config
        dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return (z.float() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
