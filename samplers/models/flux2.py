"""FLUX.2 family adapters: FLUX.2 [dev] (`Flux2Pipeline`, Mistral-3 encoder, embedded guidance)
and FLUX.2 [klein] (`Flux2KleinPipeline`, Qwen3 encoder, CFG).

The same calls as every adapter, on the patchified latents FLUX.2 denoises [B, 4C, H/16, W/16]:

    cond = model.encode_prompt(prompts)                 # Flux2Cond
    v = model.velocity(latents, sigma, cond, guidance)  # CFG rule inside, fp32 out
    images = model.decode(latents)                      # float in [0, 1], (B, 3, H, W)
    sigmas = model.sigmas(num_steps, height, width)     # the pipeline's empirical-mu schedule

Following `Flux2KleinPipeline` (diffusers) exactly:
- prompt: each prompt in the tokenizer's chat template (`enable_thinking=False`), padded to
  `max_sequence_length` (512), the hidden states of layers `text_encoder_out_layers` (9, 18, 27)
  concatenated on channels; text position ids (0, 0, 0, l).
- latents: FLUX.2's VAE latents are 2x2-patchified and batch-normalised (`vae.bn` running
  statistics); the adapter's latent grid is that patchified [4C, h, w] tensor (the pipeline's
  `latents` argument), flattened to tokens with (0, row, column, 0) ids inside `velocity`.
- guidance: true CFG against the empty prompt for guidance > 1, except for the step-distilled
  checkpoints (`is_distilled`, the pipeline's config), which run one branch; no guidance
  embedding. Timestep sigma * 1000 / 1000 in fp32.
- schedule: linspace(1, 1/S, S) shifted by exp(mu) with the pipeline's `compute_empirical_mu`
  (a function of the token count and of S), through the checkpoint's scheduler.
FLUX.2 [dev] (`Flux2Pipeline`, `Flux2Adapter`) shares the transformer, latents and schedule; its
prompt is the pipeline's system message + the prompt as a chat through the processor's template
(`format_input`), read from the Mistral-3 encoder at layers (10, 20, 30); guidance-distilled, so
`guidance` is the embedded scale (one forward pass, no CFG branch). The pipeline's optional caption
upsampling (a generation by the VL model) is not part of the adapter.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .common import BatchedCond
from .flux import pipeline_timestep
from .pipeline_adapter import PipelineAdapter, as_prompt_list, negatives_for


def position_ids(rows: int, cols: int, length: int = 1, device=None) -> torch.Tensor:
    """[rows * cols * length, 4] (t, h, w, l) ids of FLUX.2 tokens: latents (0, h, w, 0) for
    rows x cols, text (0, 0, 0, l) for rows = cols = 1 and `length` tokens. Built once per shape
    and device (read-only; the transformer never writes into its ids)."""
    return _position_ids(rows, cols, length, str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=64)
def _position_ids(rows: int, cols: int, length: int, device: str) -> torch.Tensor:
    t, h, w, l = torch.arange(1), torch.arange(rows), torch.arange(cols), torch.arange(length)
    return torch.cartesian_prod(t, h, w, l).to(device)


@dataclass
class Flux2Cond(BatchedCond):
    """prompt_embeds [B, L, D] and the empty prompt's embeddings (None without CFG)."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None


class Flux2KleinAdapter(PipelineAdapter):
    """FLUX.2 [klein]: `Flux2Transformer2DModel` + `AutoencoderKLFlux2` + Qwen3 (causal LM)."""

    family = "flux2_klein"
    pipeline_class_name = "Flux2KleinPipeline"
    component_names = ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")
    # Flux2KleinPipeline's call defaults: 50 steps, CFG 4.0, 1024 px
    base_defaults = {"num_steps": 50, "guidance": 4.0, "resolution": 1024}
    settings_keys = ("max_sequence_length", "text_encoder_out_layers", "is_distilled")
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

    def __init__(self, components: dict, defaults: dict | None = None, max_sequence_length: int = 512,
                 text_encoder_out_layers: Sequence[int] = (9, 18, 27), is_distilled: bool = False):
        super().__init__(components, defaults, max_sequence_length=max_sequence_length,
                         text_encoder_out_layers=[int(k) for k in text_encoder_out_layers],
                         is_distilled=bool(is_distilled))

    @classmethod
    def from_pipeline(cls, pipe, defaults: dict | None = None, **settings):
        settings.setdefault("is_distilled", bool(pipe.config.get("is_distilled", False)))
        return super().from_pipeline(pipe, defaults=defaults, **settings)

    def pipeline(self):
        pipe = self.pipeline_class()(**{name: getattr(self, name) for name in self.component_names},
                                     is_distilled=self.is_distilled)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ------------------------------------------------------------------ shapes
    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(4C, H/2f, W/2f): the patchified latents of a `height` x `width` image."""
        f = self.vae_scale_factor * 2
        height, width = self.image_hw(height, width, f)
        return (self.transformer.config.in_channels, height // f, width // f)

    def _schedule_inputs(self, num_steps: int, height, width, **kwargs):
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        _, h, w = self.latent_shape(height, width)
        custom = None if self.scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps,
                                                                                              num_steps)
        return custom, compute_empirical_mu(image_seq_len=h * w, num_steps=num_steps)

    # ------------------------------------------------------------------ text
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=False) for p in prompts]
        inputs = [self.tokenizer(t, return_tensors="pt", padding="max_length", truncation=True,
                                 max_length=self.max_sequence_length) for t in texts]
        device = self.text_encoder.device
        ids = torch.cat([i["input_ids"] for i in inputs]).to(device)
        mask = torch.cat([i["attention_mask"] for i in inputs]).to(device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                   use_cache=False).hidden_states
        layers = torch.stack([hidden[k] for k in self.text_encoder_out_layers], dim=1)  # [B, K, L, D]
        b, k, length, d = layers.shape
        return layers.permute(0, 2, 1, 3).reshape(b, length, k * d)

    def encode_prompt(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      grad: bool = False, images: Any = None) -> Flux2Cond:
        """Prompts [B] -> Flux2Cond. The pipeline's CFG branch is always the empty prompt: any
        `negative_prompt` (not None) turns it on, its text is not used."""
        if images is not None:
            raise ValueError("reference images of FLUX.2 are not supported by this adapter yet")
        prompts = as_prompt_list(prompts)
        with torch.set_grad_enabled(grad):
            embeds = self._encode(prompts)
            negative = None
            if negative_prompt is not None and not self.is_distilled:
                negative = self._encode(negatives_for("", len(prompts)))
        return Flux2Cond(embeds, negative)

    # ------------------------------------------------------------------ flow
    def _transformer(self, tokens, timestep, embeds, img_ids, guidance=None):
        b, length = embeds.shape[:2]
        txt_ids = position_ids(1, 1, length, device=tokens.device).expand(b, -1, -1)
        out = self.transformer(hidden_states=tokens.to(self.dtype), timestep=timestep.to(self.dtype), guidance=guidance,
                               encoder_hidden_states=embeds.to(self.dtype), txt_ids=txt_ids, img_ids=img_ids,
                               return_dict=False)[0]
        return out.float()

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: Flux2Cond,
                 guidance: float | None = None, detach_uncond: bool = False) -> torch.Tensor:
        """v = eps - x0 (fp32) at patchified latents [B, 4C, h, w]; CFG for guidance > 1 with the
        cond's empty-prompt branch (never for distilled checkpoints)."""
        b, c, h, w = latents.shape
        guidance = self.defaults["guidance"] if guidance is None else guidance
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(b)
        tokens = latents.reshape(b, c, h * w).permute(0, 2, 1)  # the pipeline's _pack_latents
        img_ids = position_ids(h, w, device=latents.device).expand(b, -1, -1)
        timestep = pipeline_timestep(sigma)
        v = self._transformer(tokens, timestep, cond.prompt_embeds, img_ids)
        if guidance > 1 and cond.negative_prompt_embeds is not None and not self.is_distilled:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_uncond):
                v_neg = self._transformer(tokens, timestep, cond.negative_prompt_embeds, img_ids)
            v = v_neg + guidance * (v - v_neg)
        return v.permute(0, 2, 1).reshape(b, c, h, w)

    # ------------------------------------------------------------------ pixels <-> latents
    def _bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 4C, h, w] patchified latents -> images float32 in [0, 1], [B, 3, H, W]."""
        from diffusers import Flux2KleinPipeline

        mean, std = self._bn_stats(latents)
        z = Flux2KleinPipeline._unpatchify_latents(latents * std + mean)
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Images in [0, 1], [B, 3, H, W] -> patchified, normalised latents (mode unless `sample`)."""
        from diffusers import Flux2KleinPipeline

        dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        z = Flux2KleinPipeline._patchify_latents((dist.sample(generator) if sample else dist.mode()).float())
        mean, std = self._bn_stats(z)
        return (z - mean) / std


class Flux2Adapter(Flux2KleinAdapter):
    """FLUX.2 [dev]: `Flux2Transformer2DModel` (guidance embedding) + `AutoencoderKLFlux2` + Mistral-3."""

    family = "flux2"
    pipeline_class_name = "Flux2Pipeline"
    # Flux2Pipeline's call defaults: 50 steps, embedded guidance 4.0, 1024 px
    base_defaults = {"num_steps": 50, "guidance": 4.0, "resolution": 1024}
    settings_keys = ("max_sequence_length", "text_encoder_out_layers")

    def __init__(self, components: dict, defaults: dict | None = None, max_sequence_length: int = 512,
                 text_encoder_out_layers: Sequence[int] = (10, 20, 30)):
        PipelineAdapter.__init__(self, components, defaults, max_sequence_length=max_sequence_length,
                                 text_encoder_out_layers=[int(k) for k in text_encoder_out_layers])
        self.is_distilled = True  # guidance-distilled: never a CFG branch

    @classmethod
    def from_pipeline(cls, pipe, defaults: dict | None = None, **settings):
        return PipelineAdapter.from_pipeline.__func__(cls, pipe, defaults=defaults, **settings)

    def pipeline(self):
        return PipelineAdapter.pipeline(self)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        inputs = self.tokenizer.apply_chat_template(format_input(prompts=prompts, system_message=SYSTEM_MESSAGE),
                                                    add_generation_prompt=False, tokenize=True, return_dict=True,
                                                    return_tensors="pt", padding="max_length", truncation=True,
                                                    max_length=self.max_sequence_length)
        device = self.text_encoder.device
        hidden = self.text_encoder(input_ids=inputs["input_ids"].to(device),
                                   attention_mask=inputs["attention_mask"].to(device), output_hidden_states=True,
                                   use_cache=False).hidden_states
        layers = torch.stack([hidden[k] for k in self.text_encoder_out_layers], dim=1)  # [B, K, L, D]
        b, k, length, d = layers.shape
        return layers.permute(0, 2, 1, 3).reshape(b, length, k * d)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: Flux2Cond,
                 guidance: float | None = None, detach_uncond: bool = False) -> torch.Tensor:
        """v = eps - x0 (fp32) at patchified latents [B, 4C, h, w]; `guidance` is the embedded
        scale (default: the checkpoint's), one forward pass."""
        b, c, h, w = latents.shape
        scale = self.defaults["guidance"] if guidance is None else guidance
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(b)
        tokens = latents.reshape(b, c, h * w).permute(0, 2, 1)
        img_ids = position_ids(h, w, device=latents.device).expand(b, -1, -1)
        g = torch.full((b,), float(scale), device=latents.device, dtype=torch.float32)
        v = self._transformer(tokens, pipeline_timestep(sigma), cond.prompt_embeds, img_ids, g)
        return v.permute(0, 2, 1).reshape(b, c, h, w)
