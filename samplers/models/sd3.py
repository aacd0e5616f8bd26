"""Stable Diffusion 3 / 3.5 family adapter (also the built-in ShapesWorld toy model).

The adapter turns diffusers components into the three calls every sampler and trainer uses:

    cond = model.encode_prompt(prompts)                 # SD3Cond, negative prompt inside
    v = model.velocity(latents, sigma, cond, guidance)  # CFG inside, fp32 out
    images = model.decode(latents)                      # float in [0, 1], (B, 3, H, W)

Prompt encoding follows `StableDiffusion3Pipeline.encode_prompt` exactly (two CLIP encoders,
penultimate hidden states concatenated on channels and zero-padded to the T5 width, T5 tokens
appended on the sequence axis, pooled outputs concatenated), so our sampling loop reproduces
the pipeline's output for the same components, seed and steps (tests/test_sd3_adapter.py).
Without a T5 encoder the pipeline appends `max_sequence_length` zero tokens; the toy model sets
that length to 0 (its `genalign.json`), which the pipeline reproduces with
`max_sequence_length=0`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Sequence

import torch

from .common import LoraAdapterMixin, ScaledVAEMixin

ADAPTER_SETTINGS_FILE = "genalign.json"  # optional per-checkpoint adapter settings


@dataclass
class SD3Cond:
    """Text conditioning for a batch.

    prompt_embeds: [B, L, D]; pooled: [B, P]; negative_* the same shapes (None without CFG).
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    # [negative; positive] tensors for CFG, built once on first use (not copied by index/to/cat)
    _cfg_cache: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def cfg_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds [2B, L, D], pooled [2B, P]): unconditional rows first, as diffusers orders them."""
        if self._cfg_cache is None:
            self._cfg_cache = (torch.cat([self.negative_prompt_embeds, self.prompt_embeds]),
                               torch.cat([self.negative_pooled, self.pooled]))
        return self._cfg_cache

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> "SD3Cond":
        return replace(self, **{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                                for f in fields(self) if f.init})

    def index(self, idx) -> "SD3Cond":
        """Rows `idx` (slice, index tensor or list) of every tensor."""
        return self._map(lambda t: t[idx])

    def repeat_interleave(self, k: int) -> "SD3Cond":
        """Each prompt's conditioning repeated k times in a row (a group of k samples)."""
        return self._map(lambda t: t.repeat_interleave(k, dim=0))

    def to(self, *args, **kwargs) -> "SD3Cond":
        return self._map(lambda t: t.to(*args, **kwargs))

    @staticmethod
    def cat(conds: Sequence["SD3Cond"]) -> "SD3Cond":
        first = conds[0]
        return replace(first, **{
            f.name: (None if getattr(first, f.name) is None else torch.cat([getattr(c, f.name) for c in conds]))
            for f in fields(first) if f.init})


class SD3Adapter(ScaledVAEMixin, LoraAdapterMixin, torch.nn.Module):
    """SD3-family flow model: `SD3Transformer2DModel` + `AutoencoderKL` + CLIP (+ optional T5).

    Args:
        transformer, vae: diffusers models.
        text_encoders: the two `CLIPTextModelWithProjection` slots (SD3's CLIP-L and CLIP-G).
        tokenizers: their `CLIPTokenizer`s.
        text_encoder_3, tokenizer_3: T5 slot, may be None (zeros are used, as in diffusers).
        max_sequence_length: T5 token count (256 in diffusers' pipeline; 0 for the toy).
        defaults: default sampler settings for this checkpoint (num_steps, guidance, shift).
    """

    family = "sd3"
    # Flow-GRPO's targets: attention q/k/v/out and the add_* context projections
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

    @staticmethod
    def lora_pipeline():
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def __init__(self, transformer, vae, text_encoders, tokenizers, text_encoder_3=None, tokenizer_3=None,
                 max_sequence_length: int = 256, defaults: dict | None = None):
        super().__init__()
        if len(text_encoders) != 2 or len(tokenizers) != 2:
            raise ValueError("SD3 needs exactly two CLIP text encoders and tokenizers (diffusers' layout)")
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoders[0]
        self.text_encoder_2 = text_encoders[1]
        self.text_encoder_3 = text_encoder_3
        self.tokenizers = list(tokenizers)
        self.tokenizer_3 = tokenizer_3
        self.max_sequence_length = max_sequence_length
        self.defaults = {"num_steps": 28, "guidance": 7.0, "shift": 3.0, **(defaults or {})}

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Native image side in pixels (transformer.sample_size latents x VAE factor)."""
        return self.transformer.config.sample_size * self.vae_scale_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(C, H/f, W/f) latent shape for an image of `height` x `width` (default: native size)."""
        height = height or self.image_size
        width = width or self.image_size
        f = self.vae_scale_factor * self.transformer.config.patch_size
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} must be divisible by {f} for this model")
        return (self.transformer.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    # ------------------------------------------------------------------ text
    def _clip_embeds(self, index: int, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer = self.tokenizers[index]
        encoder = (self.text_encoder, self.text_encoder_2)[index]
        max_length = self.tokenizers[0].model_max_length  # the pipeline uses tokenizer 1's length
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids.to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2], out[0]  # penultimate layer [B,L,h], pooled projection [B,p]

    def _t5_embeds(self, prompts: list[str], width: int) -> torch.Tensor:
        if self.text_encoder_3 is None:
            return torch.zeros(len(prompts), self.max_sequence_length, width, device=self.device,
                               dtype=self.text_encoder.dtype)
        ids = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length,
                               truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        return self.text_encoder_3(ids.to(self.text_encoder_3.device))[0]

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        h1, p1 = self._clip_embeds(0, prompts)
        h2, p2 = self._clip_embeds(1, prompts)
        clip = torch.cat([h1, h2], dim=-1)
        width = (self.text_encoder_3.config.d_model if self.text_encoder_3 is not None
                 else self.transformer.config.joint_attention_dim)
        t5 = self._t5_embeds(prompts, width).to(clip.device, clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([p1, p2], dim=-1)

    def encode_prompt(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
                      grad: bool = False) -> SD3Cond:
        """Encodes prompts (and the negative prompt for CFG; None disables it). [B] -> SD3Cond."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompt got an empty prompt list")
        with torch.set_grad_enabled(grad):
            embeds, pooled = self._encode(prompts)
            if negative_prompt is None:
                return SD3Cond(embeds, pooled)
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            neg_embeds, neg_pooled = self._encode(negatives)
        return SD3Cond(embeds, pooled, neg_embeds, neg_pooled)

    # ------------------------------------------------------------------ flow
    def _transformer(self, latents, sigma, embeds, pooled):
        out = self.transformer(hidden_states=latents.to(self.dtype), timestep=(sigma * 1000).to(self.dtype),
                               encoder_hidden_states=embeds.to(self.dtype), pooled_projections=pooled.to(self.dtype),
                               return_dict=False)[0]
        return out.float()

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: SD3Cond,
                 guidance: float = 1.0, detach_uncond: bool = False) -> torch.Tensor:
        """Predicted velocity v = eps - x0 (fp32) with classifier-free guidance inside.

        latents: [B, C, H, W]; sigma: scalar or [B] in [0, 1]. As in diffusers' pipeline, CFG runs
        only for guidance > 1; guidance <= 1 or a cond without negatives is the conditional branch.
        detach_uncond: the unconditional branch is a constant for autograd (Flow-GRPO's training
        forward); the value is unchanged.
        """
        b = latents.shape[0]
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(b)
        if guidance <= 1.0 or cond.negative_prompt_embeds is None:
            return self._transformer(latents, sigma, cond.prompt_embeds, cond.pooled)
        embeds, pooled = cond.cfg_pair()
        v = self._transformer(torch.cat([latents, latents]), torch.cat([sigma, sigma]), embeds, pooled)
        v_uncond, v_cond = v.chunk(2)
        if detach_uncond:
            v_uncond = v_uncond.detach()
        return v_uncond + guidance * (v_cond - v_uncond)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, torch_dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", **kwargs) -> "SD3Adapter":
        """Loads a diffusers-layout SD3/3.5 checkpoint (local folder or hub id).

        A missing `tokenizer`/`tokenizer_2` folder is replaced by the offline CLIP tokenizer (the
        toy ships no vocabulary files); a `genalign.json` beside `model_index.json` may set
        `tokenizer_max_length`, `max_sequence_length` and sampler `defaults`.
        """
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        root = Path(path_or_id)
        is_local = root.exists()
        if not is_local and (str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1):
            raise FileNotFoundError(f"model path not found: {path_or_id}")
        settings = {}
        if is_local and (root / ADAPTER_SETTINGS_FILE).is_file():
            settings = json.loads((root / ADAPTER_SETTINGS_FILE).read_text())
        src = str(path_or_id)
        load = dict(torch_dtype=torch_dtype, **kwargs)
        transformer = SD3Transformer2DModel.from_pretrained(src, subfolder="transformer", **load)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **load)
        encoders = [CLIPTextModelWithProjection.from_pretrained(src, subfolder=sub, **load)
                    for sub in ("text_encoder", "text_encoder_2")]

        def tokenizer(sub):
            if is_local and not (root / sub).is_dir():
                from .clip_tokenizer import build_clip_tokenizer

                return build_clip_tokenizer(settings.get("tokenizer_max_length", 77))
            return CLIPTokenizer.from_pretrained(src, subfolder=sub)

        tokenizers = [tokenizer("tokenizer"), tokenizer("tokenizer_2")]
        text_encoder_3 = tokenizer_3 = None
        has_t5 = (root / "text_encoder_3").is_dir() if is_local else True
        if has_t5 and settings.get("load_t5", True):
            from transformers import T5EncoderModel, T5TokenizerFast

            text_encoder_3 = T5EncoderModel.from_pretrained(src, subfolder="text_encoder_3", **load)
            tokenizer_3 = T5TokenizerFast.from_pretrained(src, subfolder="tokenizer_3")
        model = cls(transformer, vae, encoders, tokenizers, text_encoder_3, tokenizer_3,
                    max_sequence_length=settings.get("max_sequence_length", 256),
                    defaults=settings.get("defaults"))
        return model.to(device).eval().requires_grad_(False)

    def save_pretrained(self, directory: str | Path, settings: dict | None = None) -> Path:
        """Writes the components in diffusers layout (plus `genalign.json` settings)."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(root / "transformer")
        self.vae.save_pretrained(root / "vae")
        self.text_encoder.save_pretrained(root / "text_encoder")
        self.text_encoder_2.save_pretrained(root / "text_encoder_2")
        if self.text_encoder_3 is not None:
            self.text_encoder_3.save_pretrained(root / "text_encoder_3")
            self.tokenizer_3.save_pretrained(root / "tokenizer_3")
        all_settings = {"tokenizer_max_length": self.tokenizers[0].model_max_length,
                        "max_sequence_length": self.max_sequence_length, "defaults": self.defaults,
                        **(settings or {})}
        (root / ADAPTER_SETTINGS_FILE).write_text(json.dumps(all_settings, indent=2) + "\n")
        return root
