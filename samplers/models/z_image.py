"""Z-Image family adapter (`ZImagePipeline`): a single-stream DiT on a Qwen3 text encoder.

The same calls as every adapter, on image latents [B, C, H/8, W/8]:

    cond = model.encode_prompt(prompts)                 # ZImageCond
    v = model.velocity(latents, sigma, cond, guidance)  # Z-Image's CFG rule inside, fp32 out
    images = model.decode(latents)                      # float in [0, 1], (B, 3, H, W)
    sigmas = model.sigmas(num_steps, height, width)     # the pipeline's schedule

Following `ZImagePipeline` (diffusers) exactly:
- prompt: the tokenizer's chat template (one user turn, generation prompt, `enable_thinking`),
  padded to `max_sequence_length` (512), the encoder's second-to-last hidden state; each prompt
  keeps only its valid tokens (variable lengths; stored zero-padded with their `lengths`).
- time runs the other way inside the transformer: it gets (1000 - sigma * 1000) / 1000 (0 at
  noise) and predicts -v; the adapter returns v = -output, the rectified-flow velocity the
  samplers use.
- guidance: CFG whenever the scale is > 0 and the cond has negatives (Z-Image's own rule, not
  > 1), in the form v_cond + s (v_cond - v_uncond); the pipeline's optional `cfg_truncation`
  (no CFG where 1 - sigma exceeds it) and `cfg_normalization` (the guided norm capped at that
  multiple of the conditional one, per sample) are `defaults` entries. Z-Image-Turbo samples
  with guidance 0 (one branch).
- schedule: linspace(1, 1/S, S) through the checkpoint's scheduler: the dynamic shift of mu from
  the token count, or a fixed shift when the config turns dynamic shifting off (Turbo: 3.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .common import BatchedCond, ScaledVAEMixin
from .pipeline_adapter import PipelineAdapter, as_prompt_list, negatives_for


@dataclass
class ZImageCond(BatchedCond):
    """prompt_embeds [B, L, D] zero-padded to max_sequence_length, lengths [B] long (valid tokens
    per prompt); the negatives the same way (None without CFG)."""

    prompt_embeds: torch.Tensor
    lengths: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_lengths: torch.Tensor | None = None


def _valid(embeds: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """The transformer's caption list: each row's first `lengths[i]` tokens."""
    return [e[:n] for e, n in zip(embeds, lengths.tolist())]


class ZImageAdapter(ScaledVAEMixin, PipelineAdapter):
    """Z-Image (base / Turbo): `ZImageTransformer2DModel` + `AutoencoderKL` + a Qwen3 encoder."""

    family = "z_image"
    pipeline_class_name = "ZImagePipeline"
    component_names = ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")
    # ZImagePipeline's call defaults: 50 steps, guidance 5.0, no truncation / normalisation, 1024 px
    base_defaults = {"num_steps": 50, "guidance": 5.0, "cfg_truncation": 1.0, "cfg_normalization": 0.0,
                     "resolution": 1024}
    settings_keys = ("max_sequence_length",)
    default_lora_targets = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")

    def __init__(self, components: dict, defaults: dict | None = None, max_sequence_length: int = 512):
        super().__init__(components, defaults, max_sequence_length=max_sequence_length)

    # ------------------------------------------------------------------ shapes
    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        f = self.vae_scale_factor * 2
        height, width = self.image_hw(height, width, f)
        return (self.transformer.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def _schedule_inputs(self, num_steps: int, height, width, **kwargs):
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

        _, h, w = self.latent_shape(height, width)
        cfg = self.scheduler.config
        mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return get_default_z_image_sigmas(num_steps), mu

    # ------------------------------------------------------------------ text
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=True) for p in prompts]
        inputs = self.tokenizer(texts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                return_tensors="pt")
        device = self.text_encoder.device
        mask = inputs.attention_mask.to(device).bool()
        hidden = self.text_encoder(input_ids=inputs.input_ids.to(device), attention_mask=mask,
                                   output_hidden_states=True).hidden_states[-2]
        # the pipeline keeps each prompt's valid tokens (the tokenizer pads on the right)
        lengths = mask.sum(dim=1)
        keep = torch.arange(hidden.shape[1], device=device)[None, :] < lengths[:, None]
        return torch.where(keep[..., None], hidden, torch.zeros_like(hidden)), lengths

    def encode_prompt(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      grad: bool = False, images: Any = None) -> ZImageCond:
        """Prompts [B] (and negatives for CFG) -> ZImageCond. Text-to-image only."""
        if images is not None:
            raise ValueError("ZImagePipeline is text-to-image; it takes no input image")
        prompts = as_prompt_list(prompts)
        with torch.set_grad_enabled(grad):
            embeds, lengths = self._encode(prompts)
            neg = (None, None)
            if negative_prompt is not None:
                neg = self._encode(negatives_for(negative_prompt, len(prompts)))
        return ZImageCond(embeds, lengths, *neg)

    # ------------------------------------------------------------------ flow
    def _transformer(self, latents: torch.Tensor, t: torch.Tensor, captions: list[torch.Tensor]) -> torch.Tensor:
        x = list(latents.to(self.dtype).unsqueeze(2).unbind(0))  # [C, 1, H, W] per sample
        out = self.transformer(x, t, [c.to(self.dtype) for c in captions], return_dict=False)[0]
        return torch.stack([o.float() for o in out]).squeeze(2)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: ZImageCond,
                 guidance: float | None = None, detach_uncond: bool = False) -> torch.Tensor:
        """v = eps - x0 (fp32) at latents [B, C, H, W], sigma scalar or [B].

        CFG for guidance > 0 with negatives: v_c + s (v_c - v_u) on the transformer's outputs,
        then the sign flip; no CFG for samples where 1 - sigma > defaults["cfg_truncation"].
        detach_uncond: the negative branch is a constant for autograd.
        """
        b = latents.shape[0]
        guidance = self.defaults["guidance"] if guidance is None else guidance
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(b)
        t = (1000 - sigma * 1000) / 1000  # the pipeline's (1000 - timestep) / 1000
        captions = _valid(cond.prompt_embeds, cond.lengths)
        if guidance <= 0 or cond.negative_prompt_embeds is None:
            return -self._transformer(latents, t, captions)
        out = self._transformer(torch.cat([latents, latents]), torch.cat([t, t]),
                                captions + _valid(cond.negative_prompt_embeds, cond.negative_lengths))
        pos, neg = out[:b], out[b:]
        if detach_uncond:
            neg = neg.detach()
        # per-sample scale: 0 where CFG is truncated (pos + 0 * (pos - neg) == pos exactly)
        scale = torch.where(t > float(self.defaults.get("cfg_truncation", 1.0)), 0.0, float(guidance))
        pred = pos + scale.view(-1, 1, 1, 1) * (pos - neg)
        limit = float(self.defaults.get("cfg_normalization") or 0.0)
        if limit > 0:
            pos_norm = torch.linalg.vector_norm(pos.flatten(1), dim=1) * limit
            pred_norm = torch.linalg.vector_norm(pred.flatten(1), dim=1)
            factor = torch.where(pred_norm > pos_norm, pos_norm / pred_norm, torch.ones_like(pred_norm))
            pred = pred * factor.view(-1, 1, 1, 1)
        return -pred
