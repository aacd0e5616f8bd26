"""HunyuanVideo family adapter (`HunyuanVideoPipeline`): text-to-video with embedded guidance.

The same calls as every adapter, on video latents [B, C, T', H', W']:

    cond = model.encode_prompt(prompts)                 # HunyuanVideoCond
    v = model.velocity(latents, sigma, cond, guidance)  # embedded guidance inside, fp32 out
    videos = model.decode(latents)                      # float in [0, 1], (B, 3, T, H, W)
    sigmas = model.sigmas(num_steps)                    # the pipeline's schedule

Following `HunyuanVideoPipeline` (diffusers) exactly:
- prompt: the pipeline's video-description template around each prompt, padded to
  `max_sequence_length` (256) + the template's `crop_start` tokens, the Llama encoder's hidden
  state two layers before the last, the template's tokens cropped off, with its attention mask;
  CLIP's pooled output (77 tokens).
- guidance: guidance-distilled like FLUX.1-dev: `guidance` (default 6.0) is embedded
  (x 1000, in the transformer's dtype), one forward pass; true CFG only with a negative prompt
  and `defaults["true_cfg_scale"] > 1`.
- timestep: sigma * 1000 (the scheduler's timestep, not divided).
- schedule: linspace(1, 0, S + 1)[:-1] through the checkpoint's scheduler (fixed shift, 7.0
  for HunyuanVideo).
- VAE: `AutoencoderKLHunyuanVideo` (causal 3-D, 4x time, 8x space), latents x scaling_factor.
HunyuanVideo 1.5 (`HunyuanVideo15Pipeline`: another transformer, Qwen2.5-VL + ByT5 encoders) is a
different structure and not covered by this adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .common import BatchedCond
from .pipeline_adapter import PipelineAdapter, as_prompt_list, negatives_for

# HunyuanVideoPipeline's call defaults: 129 frames of 720x1280, 50 steps, embedded guidance 6
HUNYUAN_VIDEO_SIZE = (129, 720, 1280)


@dataclass
class HunyuanVideoCond(BatchedCond):
    """prompt_embeds [B, L, D] (Llama), prompt_mask [B, L], pooled [B, P] (CLIP), their
    negatives (None without true CFG)."""

    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor
    pooled: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_prompt_mask: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None


class HunyuanVideoAdapter(PipelineAdapter):
    """HunyuanVideo: `HunyuanVideoTransformer3DModel` + `AutoencoderKLHunyuanVideo` + Llama + CLIP."""

    family = "hunyuan_video"
    pipeline_class_name = "HunyuanVideoPipeline"
    component_names = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler", "text_encoder_2", "tokenizer_2")
    base_defaults = {"num_steps": 50, "guidance": 6.0, "true_cfg_scale": 1.0}
    settings_keys = ("max_sequence_length", "video_size")
    # DanceGRPO / FLUX-style targets: the dual-stream attention and the single-stream q/k/v
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

    def __init__(self, components: dict, defaults: dict | None = None, max_sequence_length: int = 256,
                 video_size: Sequence[int] = HUNYUAN_VIDEO_SIZE):
        super().__init__(components, defaults, max_sequence_length=max_sequence_length,
                         video_size=[int(n) for n in video_size])

    # ------------------------------------------------------------------ shapes
    @property
    def image_size(self) -> int:
        """Native frame height in pixels (samplers' square `resolution` refers to it)."""
        return self.video_size[1]

    @property
    def num_frames(self) -> int:
        return self.video_size[0]

    def latent_shape(self, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, int, int, int]:
        """(C, T', H/8, W/8) latents of a `num_frames` x `height` x `width` video (T' = (T - 1) / 4 + 1)."""
        frames, native_h, native_w = self.video_size
        height = height or native_h
        width = width or (height if native_h == native_w else native_w)
        num_frames = num_frames or frames
        fs, ft = self.vae.spatial_compression_ratio, self.vae.temporal_compression_ratio
        p = self.transformer.config.patch_size
        if height % (fs * p) or width % (fs * p):
            raise ValueError(f"frame size {height}x{width} must be divisible by {fs * p} for this model")
        if (num_frames - 1) % ft:
            raise ValueError(f"num_frames - 1 must be divisible by {ft} for this VAE, got {num_frames}")
        return (self.transformer.config.in_channels, (num_frames - 1) // ft + 1, height // fs, width // fs)

    def _schedule_inputs(self, num_steps: int, height, width, **kwargs):
        return np.linspace(1.0, 0.0, num_steps + 1)[:-1], None

    # ------------------------------------------------------------------ text
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        template, crop = DEFAULT_PROMPT_TEMPLATE["template"], DEFAULT_PROMPT_TEMPLATE["crop_start"]
        inputs = self.tokenizer([template.format(p) for p in prompts], max_length=self.max_sequence_length + crop,
                                padding="max_length", truncation=True, return_tensors="pt",
                                return_attention_mask=True)
        device = self.text_encoder.device
        ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
        embeds = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-3]
        clip_ids = self.tokenizer_2(prompts, padding="max_length", max_length=77, truncation=True,
                                    return_tensors="pt").input_ids
        pooled = self.text_encoder_2(clip_ids.to(self.text_encoder_2.device), output_hidden_states=False).pooler_output
        return embeds[:, crop:], mask[:, crop:], pooled

    def encode_prompt(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      grad: bool = False, images: Any = None) -> HunyuanVideoCond:
        """Prompts [B] (and negatives, for true CFG only) -> HunyuanVideoCond (text-to-video)."""
        if images is not None:
            raise ValueError("HunyuanVideoPipeline is text-to-video; it takes no input image")
        prompts = as_prompt_list(prompts)
        with torch.set_grad_enabled(grad):
            embeds, mask, pooled = self._encode(prompts)
            neg = (None, None, None)
            if negative_prompt is not None:
                neg = self._encode(negatives_for(negative_prompt, len(prompts)))
        return HunyuanVideoCond(embeds, mask, pooled, *neg)

    # ------------------------------------------------------------------ flow
    def _transformer(self, latents, timestep, guidance, embeds, mask, pooled):
        out = self.transformer(hidden_states=latents.to(self.dtype), timestep=timestep,
                               encoder_hidden_states=embeds.to(self.dtype), encoder_attention_mask=mask.to(self.dtype),
                               pooled_projections=pooled.to(self.dtype), guidance=guidance, return_dict=False)[0]
        return out.float()

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: HunyuanVideoCond,
                 guidance: float | None = None, detach_uncond: bool = False) -> torch.Tensor:
        """v = eps - x0 (fp32) at latents [B, C, T', H', W']; `guidance` is the embedded scale
        (default: the checkpoint's); true CFG with negatives when defaults["true_cfg_scale"] > 1."""
        b = latents.shape[0]
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(b)
        timestep = sigma * 1000
        scale = self.defaults["guidance"] if guidance is None else guidance
        g = torch.full((b,), float(scale), device=latents.device, dtype=self.dtype) * 1000.0
        v = self._transformer(latents, timestep, g, cond.prompt_embeds, cond.prompt_mask, cond.pooled)
        true_cfg = float(self.defaults.get("true_cfg_scale", 1.0))
        if true_cfg > 1 and cond.negative_prompt_embeds is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_uncond):
                v_neg = self._transformer(latents, timestep, g, cond.negative_prompt_embeds, cond.negative_prompt_mask,
                                          cond.negative_pooled)
            v = v_neg + true_cfg * (v - v_neg)
        return v

    # ------------------------------------------------------------------ pixels <-> latents
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, T', h, w] latents -> videos float32 in [0, 1], [B, 3, T, H, W]."""
        videos = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return (videos.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, videos: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Videos in [0, 1], [B, 3, T, H, W] -> scaled latents (posterior mode unless `sample`)."""
        dist = self.vae.encode((videos * 2 - 1).to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return z.float() * self.vae.config.scaling_factor
