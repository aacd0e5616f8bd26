"""FLUX.1 family adapters: FLUX.1-dev / schnell (`FluxPipeline`) and FLUX.1 Kontext (`FluxKontextPipeline`).

The same calls as every adapter, on unpacked latents [B, C, H/8, W/8]:

    cond = model.encode_prompt(prompts)                 # FluxCond (Kontext: images=... too)
    v = model.velocity(latents, sigma, cond, guidance)  # packing + guidance rule inside, fp32 out
    images = model.decode(latents)                      # float in [0, 1], (B, 3, H, W)
    sigmas = model.sigmas(num_steps, height, width)     # the pipeline's dynamic-shift schedule

Following `FluxPipeline` (diffusers) exactly:
- prompt: CLIP's pooled output (77 tokens) + T5's last hidden state (`max_sequence_length`
  tokens, 512 in the pipeline); text position ids are zeros.
- latents are packed 2x2 into tokens of 4C channels inside `velocity` (`pack_latents`), with
  (0, row, column) position ids; samplers and trainers keep the unpacked grid, on which the
  Euler step is the same element-wise update.
- guidance: FLUX.1-dev is guidance-distilled, so `guidance` is the embedded scale fed to the
  transformer (`guidance_embeds`), one forward pass; schnell (no guidance embedding) ignores it.
  True two-branch CFG runs only with a negative prompt and `true_cfg_scale > 1` (the adapter's
  `defaults["true_cfg_scale"]`, 1 by default), as the pipeline's `true_cfg_scale`.
- timestep: the transformer gets sigma * 1000 / 1000 rounded in fp32, as the pipeline passes
  `timestep / 1000` from the scheduler's timesteps.
- schedule: linspace(1, 1/S, S) shifted by exp(mu), mu linear in the image token count
  (`calculate_shift` from the scheduler config), via the scheduler itself (`sigmas`).
Kontext (editing) adds the reference image's VAE latents as extra tokens after the generated
ones, with position ids (1, row, column); only the generated tokens' velocity is returned. The
image comes in through the shared path (samplers/models/image_cond.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .common import BatchedCond, ScaledVAEMixin
from .image_cond import ImageConditioning
from .pipeline_adapter import PipelineAdapter, as_prompt_list, negatives_for

FLUX_COMPONENTS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C] tokens of 2x2 patches (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, H/2 * W/2, 4C] -> [B, C, H, W] (latent height/width), the inverse of pack_latents."""
    b, _, channels = tokens.shape
    x = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)


@functools.lru_cache(maxsize=64)
def _cached_ids(rows: int, cols: int, index: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return latent_position_ids(rows, cols, index, device, dtype)


def cached_position_ids(rows: int, cols: int, index: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """latent_position_ids built once per shape and device (read-only: the transformer never writes
    into its ids), so `velocity` adds no tensor construction per step."""
    return _cached_ids(rows, cols, index, str(torch.device(device or "cpu")), dtype)


def latent_position_ids(rows: int, cols: int, index: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """[rows * cols, 3] (index, row, column) ids of packed tokens (FluxPipeline._prepare_latent_image_ids;
    Kontext's reference image uses index 1)."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def pipeline_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """sigma [B] -> the transformer's timestep as FLUX-style pipelines pass it: the scheduler's
    timestep (sigma * 1000, fp32) divided by 1000 (not always sigma bit for bit)."""
    return (sigma.float() * 1000) / 1000


@dataclass
class FluxCond(BatchedCond):
    """prompt_embeds [B, L, D] (T5), pooled [B, P] (CLIP), their negatives (None without true
    CFG), image_latents [B, C, h, w] (Kontext's reference image, None for text-to-image)."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    image_latents: torch.Tensor | None = None


class FluxAdapter(ScaledVAEMixin, PipelineAdapter):
    """FLUX.1-dev / schnell: `FluxTransformer2DModel` + `AutoencoderKL` + CLIP + T5."""

    family = "flux"
    pipeline_class_name = "FluxPipeline"
    component_names = FLUX_COMPONENTS
    # FluxPipeline's defaults (dev): 28 steps, embedded guidance 3.5, 1024 px
    base_defaults = {"num_steps": 28, "guidance": 3.5, "true_cfg_scale": 1.0, "resolution": 1024}
    settings_keys = ("max_sequence_length",)
    # flow_grpo's FLUX LoRA targets: joint attention q/k/v/out and the context projections
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

    def __init__(self, components: dict, defaults: dict | None = None, max_sequence_length: int = 512):
        super().__init__(components, defaults, max_sequence_length=max_sequence_length)

    # ------------------------------------------------------------------ shapes
    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(C, H/f, W/f) unpacked latents of a `height` x `width` image (2x2 packing needs even sides)."""
        f = self.vae_scale_factor * 2
        height, width = self.image_hw(height, width, f)
        return (self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def _schedule_inputs(self, num_steps: int, height, width, **kwargs):
        """FluxPipeline: sigmas linspace(1, 1/S, S); mu from the packed image token count."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        _, h, w = self.latent_shape(height, width)
        cfg = self.scheduler.config
        mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        custom = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        return custom, mu

    # ------------------------------------------------------------------ text
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(clip_ids.to(self.text_encoder.device), output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length,
                                  truncation=True, return_tensors="pt").input_ids
        embeds = self.text_encoder_2(t5_ids.to(self.text_encoder_2.device), output_hidden_states=False)[0]
        return embeds, pooled

    def encode_prompt(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      grad: bool = False, images: Any = None) -> FluxCond:
        """Prompts [B] (and negatives, for true CFG only) -> FluxCond. FLUX.1 is text-to-image:
        `images` is accepted for the common signature and must be None."""
        if images is not None:
            raise ValueError("FluxPipeline is text-to-image; use FluxKontextAdapter for an input image")
        return self._encode_cond(as_prompt_list(prompts), negative_prompt, grad)

    def _encode_cond(self, prompts: list[str], negative_prompt, grad: bool, image_latents=None) -> FluxCond:
        with torch.set_grad_enabled(grad):
            embeds, pooled = self._encode(prompts)
            neg_embeds = neg_pooled = None
            if negative_prompt is not None:
                neg_embeds, neg_pooled = self._encode(negatives_for(negative_prompt, len(prompts)))
        return FluxCond(embeds, pooled, neg_embeds, neg_pooled, image_latents)

    # ------------------------------------------------------------------ flow
    def _transformer(self, tokens, timestep, guidance, embeds, pooled, img_ids):
        txt_ids = torch.zeros(embeds.shape[1], 3, device=tokens.device, dtype=self.dtype)
        out = self.transformer(hidden_states=tokens.to(self.dtype), timestep=timestep.to(self.dtype),
                               guidance=guidance, pooled_projections=pooled.to(self.dtype),
                               encoder_hidden_states=embeds.to(self.dtype), txt_ids=txt_ids,
                               img_ids=img_ids.to(self.dtype), return_dict=False)[0]
        return out.float()

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: FluxCond,
                 guidance: float | None = None, detach_uncond: bool = False) -> torch.Tensor:
        """v = eps - x0 (fp32) at unpacked latents [B, C, H, W], sigma scalar or [B].

        guidance: FLUX.1-dev's embedded guidance scale (default: the checkpoint's); true CFG
        with the cond's negatives when `defaults["true_cfg_scale"] > 1`. detach_uncond: the
        negative branch of true CFG is a constant for autograd (run without a graph).
        """
        b, _, h, w = latents.shape
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(b)
        tokens = pack_latents(latents)
        n = tokens.shape[1]
        img_ids = cached_position_ids(h // 2, w // 2, device=latents.device)
        if cond.image_latents is not None:
            ref = cond.image_latents
            tokens = torch.cat([tokens, pack_latents(ref.to(tokens.dtype))], dim=1)
            img_ids = torch.cat([img_ids, cached_position_ids(ref.shape[2] // 2, ref.shape[3] // 2, index=1,
                                                              device=latents.device)])
        g = None
        if self.transformer.config.guidance_embeds:
            scale = self.defaults["guidance"] if guidance is None else guidance
            g = torch.full((b,), float(scale), device=latents.device, dtype=torch.float32)
        timestep = pipeline_timestep(sigma)
        v = self._transformer(tokens, timestep, g, cond.prompt_embeds, cond.pooled, img_ids)[:, :n]
        true_cfg = float(self.defaults.get("true_cfg_scale", 1.0))
        if true_cfg > 1 and cond.negative_prompt_embeds is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_uncond):
                v_neg = self._transformer(tokens, timestep, g, cond.negative_prompt_embeds, cond.negative_pooled,
                                          img_ids)[:, :n]
            v = v_neg + true_cfg * (v - v_neg)
        return unpack_latents(v, h, w)


class FluxKontextAdapter(ImageConditioning, FluxAdapter):
    """FLUX.1 Kontext: FLUX.1-dev plus the reference image's tokens in the sequence (editing).

    `encode_prompt(prompts, images=...)` encodes the image(s) with the VAE (posterior mode, as
    the pipeline); the image is used at its own size floored to a multiple of 16 px (the
    pipeline's `_auto_resize=False`) unless `defaults["reference_resolution"]` [H, W] is set.
    Without an image (and no `reference_images`) Kontext is text-to-image, as in the pipeline.
    """

    family = "flux_kontext"
    pipeline_class_name = "FluxKontextPipeline"
    base_defaults = {**FluxAdapter.base_defaults, "guidance": 2.5}  # FluxKontextPipeline's default

    def encode_prompt(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      grad: bool = False, images: Any = None) -> FluxCond:
        prompts = as_prompt_list(prompts)
        pixels = self.condition_images(prompts, images)
        image_latents = None
        if pixels is not None:
            multiple = self.vae_scale_factor * 2
            height, width = self.defaults.get("reference_resolution") or pixels.shape[-2:]
            from .image_cond import resize_images

            pixels = resize_images(pixels, height // multiple * multiple, width // multiple * multiple)
            with torch.set_grad_enabled(grad):
                image_latents = self.encode(pixels.to(self.device))
        return self._encode_cond(prompts, negative_prompt, grad, image_latents)
