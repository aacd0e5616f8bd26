"""Wan (2.1) family adapter: text-to-video flow models on `WanTransformer3DModel`.

The same three calls as every adapter, on video latents [B, C, T', H', W']:

    cond = model.encode_prompt(prompts)                 # WanCond, negative prompt inside
    v = model.velocity(latents, sigma, cond, guidance)  # CFG inside, fp32 out
    videos = model.decode(latents)                      # float in [0, 1], (B, 3, T, H, W)

so every sampler (samplers/rollout.py, steps.py, generate.py) and trainer runs on video unchanged.
Prompt encoding follows `WanPipeline._get_t5_prompt_embeds` exactly (diffusers' `prompt_clean`,
padding to `max_sequence_length`, the encoder's last hidden state with the padded positions
zeroed), and decoding follows the pipeline's de-normalisation (`latents_mean` / `latents_std`), so
an ODE rollout reproduces `WanPipeline` with `FlowMatchEulerDiscreteScheduler` (tests/test_wan_adapter.py).

VAEs. A Wan-family `AutoencoderKLWan` (causal 3-D, `scale_factor_temporal` x time compression:
T frames <-> (T - 1) / 4 + 1 latent frames), or a per-frame image `AutoencoderKL` (each frame
encoded and decoded on its own with its `scaling_factor` / `shift_factor`; T frames <-> T latent
frames). The per-frame VAE is what the CPU toy ShapesWorld-Video model uses (it reuses the image
toy's VAE); real Wan checkpoints use `AutoencoderKLWan`. The class is read from `vae/config.json`.

Coordinate channels (`coord_channels`, a toy option; `"coord_channels": true` in `genalign.json`).
Wan's transformer knows positions only through relative 3-D RoPE: nothing in it tells a token
where in the frame or the clip it is. On (near-)pure noise it is translation-equivariant, so its
prediction there cannot put an object on one side or make it drift one way, and that is where
a caption's direction word decides the motion (below t ~ 0.9 the noisy clip already shows it).
With the option the adapter appends three fixed channels, the t, y and x of each latent voxel
as ramps over [-1, 1], to the transformer's input (`in_channels` = latent channels + 3, as
Wan's image-to-video checkpoints widen the input for their conditioning channels); the latent
itself keeps `out_channels`. Real Wan checkpoints leave it off.

Wan2.2 (A14B): two experts of the same architecture, `transformer` for high noise and
`transformer_2` for low noise, switched at `boundary_ratio` as `WanPipeline` does: a sample whose
timestep sigma * 1000 is >= boundary_ratio * 1000 goes to `transformer` (with `guidance`), the
others to `transformer_2` (with `defaults["guidance_2"]`, the pipeline's `guidance_scale_2`,
else the same guidance). The choice is made per sample inside `velocity`, so the rollout, the
log-prob re-scoring of any stored step and CRD's random-time training all use the expert the
pipeline would use at that noise level, with no change to samplers or trainers. LoRA goes on
both experts by default (`add_lora(experts=...)` picks); the trainers optimise the LoRA of
`transformer` only (they collect `model.transformer`'s parameters), see docs.

Image-to-video (`WanImageToVideoPipeline` without a CLIP image encoder, as Wan2.2-I2V-A14B): the
first frame comes in through the shared image path (image_cond.py: `encode_prompt(prompts,
images=...)` or `reference_images`) and becomes the pipeline's condition, encoded once into the
cond: the frame followed by black frames through the VAE, normalised, behind a first-frame mask of
`scale_factor_temporal` channels; `velocity` appends it to the latents' channels (in_channels =
out_channels + mask + z_dim). The condition is built for the adapter's `video_size`.

Text encoders. Wan2.1's `UMT5EncoderModel` with its tokenizer (`tokenizer/`), or any transformers
text encoder returning `last_hidden_state` (the toy uses a CLIP text encoder with the offline CLIP
BPE, named by `"tokenizer": "clip"` in `genalign.json`, since no tokenizer files ship).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .common import BatchedCond, LoraAdapterMixin
from .image_cond import ImageConditioning

ADAPTER_SETTINGS_FILE = "genalign.json"
# WanPipeline's defaults: 81 frames of 480x832, 50 steps, CFG 5; flow_shift 3.0 for 480p.
WAN_VIDEO_SIZE = (81, 480, 832)
WAN_DEFAULTS = {"num_steps": 50, "guidance": 5.0, "shift": 3.0}


@dataclass
class WanCond(BatchedCond):
    """Text conditioning for a batch: prompt_embeds [B, L, D] (padded positions zero) and the
    negative prompt's embeddings of the same shape (None without CFG)."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    condition: torch.Tensor | None = None  # image-to-video: [B, mask + z_dim, T', H', W'] first-frame condition
    _cfg_cache: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def cfg_pair(self) -> torch.Tensor:
        """[2B, L, D]: unconditional rows first, built once on first use."""
        if self._cfg_cache is None:
            self._cfg_cache = torch.cat([self.negative_prompt_embeds, self.prompt_embeds])
        return self._cfg_cache


def coordinate_channels(latents: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W]: the t, y and x of every voxel of video latents [B, C, T, H, W] as ramps
    over [-1, 1] (a single frame or row sits at -1), in the latents' dtype and device."""
    b, _, t, h, w = latents.shape
    ramps = [torch.linspace(-1, 1, n, device=latents.device, dtype=latents.dtype) for n in (t, h, w)]
    grid = torch.stack(torch.meshgrid(*ramps, indexing="ij"))  # [3, T, H, W]
    return grid.expand(b, *grid.shape)


def _is_wan_vae(vae) -> bool:
    return "z_dim" in vae.config  # AutoencoderKLWan; an image AutoencoderKL has latent_channels



def wan_vae_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std) [1, z_dim, 1, 1, 1] of a Wan-family VAE's latents (Wan, Qwen-Image), on like's
    device and dtype: normalised latents are (z - mean) / std."""
    cfg = vae.config
    shape = (1, cfg.z_dim, 1, 1, 1)
    mean = torch.tensor(cfg.latents_mean).view(shape).to(like.device, like.dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(shape).to(like.device, like.dtype)
    return mean, inv_std

class WanAdapter(ImageConditioning, LoraAdapterMixin, torch.nn.Module):
    """Wan-family flow model: `WanTransformer3DModel` + a video or per-frame VAE + a text encoder.

    Args:
        transformer: `WanTransformer3DModel`.
        vae: `AutoencoderKLWan` or an image `AutoencoderKL` applied frame by frame.
        text_encoder, tokenizer: `UMT5EncoderModel` + its tokenizer, or any encoder/tokenizer pair.
        max_sequence_length: text tokens (WanPipeline: 512 at call time).
        video_size: native (num_frames, height, width) in pixels.
        defaults: sampler settings of this checkpoint (num_steps, guidance, shift).
        tokenizer_spec: "clip" when the tokenizer is rebuilt offline (then it is not saved).
        coord_channels: append t / y / x coordinate channels to the transformer input (module
            docstring); needs `in_channels == out_channels + 3`.
    """

    family = "wan"
    default_lora_targets = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                            "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")

    def __init__(self, transformer, vae, text_encoder, tokenizer, max_sequence_length: int = 512,
                 video_size: Sequence[int] = WAN_VIDEO_SIZE, defaults: dict | None = None,
                 tokenizer_spec: str | None = None, coord_channels: bool = False, transformer_2=None,
                 boundary_ratio: float | None = None):
        super().__init__()
        if (transformer_2 is None) != (boundary_ratio is None):
            raise ValueError("Wan2.2's two experts need both transformer_2 and boundary_ratio (or neither)")
        if boundary_ratio is not None and not 0 < boundary_ratio < 1:
            raise ValueError(f"boundary_ratio must be in (0, 1), got {boundary_ratio}")
        self.transformer_2 = transformer_2
        self.boundary_ratio = boundary_ratio
        config = transformer.config
        # image-to-video checkpoints widen the input by the first-frame mask and condition latents
        self.image_channels = config.in_channels - config.out_channels - 3 * coord_channels
        expected = (vae.config.scale_factor_temporal + vae.config.z_dim) if _is_wan_vae(vae) else None
        if self.image_channels and (coord_channels or self.image_channels != expected):
            raise ValueError(f"WanTransformer3DModel in_channels {config.in_channels} must equal out_channels "
                             f"{config.out_channels}" + (" + 3 (coord_channels)" if coord_channels else "")
                             + (f", or + {expected} (image-to-video: mask + latent condition)" if expected else ""))
        self.image_required = self.image_channels > 0  # image-to-video needs a first frame
        self.coord_channels = coord_channels
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        self.video_size = tuple(int(n) for n in video_size)
        self.defaults = {**WAN_DEFAULTS, **(defaults or {})}
        self.tokenizer_spec = tokenizer_spec

    @staticmethod
    def lora_pipeline():
        from diffusers import WanPipeline

        return WanPipeline

    # ------------------------------------------------------------------ Wan2.2 experts and their LoRA
    @property
    def experts(self) -> dict[str, torch.nn.Module]:
        """{"transformer": high-noise expert, "transformer_2": low-noise expert (Wan2.2 only)}."""
        return {"transformer": self.transformer,
                **({"transformer_2": self.transformer_2} if self.transformer_2 is not None else {})}

    def add_lora(self, rank: int = 32, alpha: int | None = None, target_modules: Sequence[str] | None = None,
                 dropout: float = 0.0, adapter_name: str = "default",
                 experts: Sequence[str] = ("transformer", "transformer_2")) -> None:
        """peft LoRA on the named experts that exist (Wan2.1: `transformer` only)."""
        from peft import LoraConfig

        unknown = set(experts) - {"transformer", "transformer_2"}
        if unknown:
            raise ValueError(f"unknown experts {sorted(unknown)}; choose from 'transformer', 'transformer_2'")
        for name, module in self.experts.items():
            if name in experts:
                module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, init_lora_weights="gaussian",
                                              target_modules=list(target_modules or self.default_lora_targets),
                                              lora_dropout=dropout), adapter_name=adapter_name)

    def _lora_experts(self) -> dict[str, torch.nn.Module]:
        return {name: m for name, m in self.experts.items() if getattr(m, "peft_config", None)}

    @contextlib.contextmanager
    def lora_disabled(self):
        """Runs the base experts (the Flow-GRPO reference) inside the block."""
        experts = list(self._lora_experts().values())
        for module in experts:
            module.disable_adapters()
        try:
            yield
        finally:
            for module in experts:
                module.enable_adapters()

    def save_lora(self, directory: str | Path) -> Path:
        """`pytorch_lora_weights.safetensors` of `transformer` in the layout WanPipeline's
        `load_lora_weights` reads; Wan2.2's low-noise expert's LoRA goes to `transformer_2/`
        beside it (load it with `load_lora_weights(dir / "transformer_2", load_into_transformer_2=True)`)."""
        from peft.utils import get_peft_model_state_dict

        directory = Path(directory)
        experts = self._lora_experts()
        if not experts:
            raise ValueError("the model has no LoRA to save (add_lora first)")
        for name, module in experts.items():
            self.lora_pipeline().save_lora_weights(
                str(directory if name == "transformer" else directory / name),
                transformer_lora_layers=get_peft_model_state_dict(module),
                transformer_lora_adapter_metadata=module.peft_config["default"].to_dict())
        return directory / "pytorch_lora_weights.safetensors"

    def load_lora(self, path: str | Path, adapter_name: str = "default") -> None:
        """Loads a LoRA saved by `save_lora` (a folder or its .safetensors file): `transformer`'s,
        and `transformer_2`'s from the `transformer_2/` subfolder when both exist."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"LoRA weights not found: {path}")
        folder, weight_name = (path.parent, path.name) if path.is_file() else (path, None)
        targets = [("transformer", folder)]
        if self.transformer_2 is not None and (folder / "transformer_2").is_dir():
            targets.append(("transformer_2", folder / "transformer_2"))
        for name, source in targets:
            state_dict, metadata = self.lora_pipeline().lora_state_dict(
                str(source), weight_name=weight_name if name == "transformer" else None, return_lora_metadata=True)
            getattr(self, name).load_lora_adapter(state_dict, prefix="transformer", adapter_name=adapter_name,
                                                  metadata=metadata)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def temporal_compression(self) -> int:
        """Video frames per latent frame (after the first, for the causal Wan VAE); 1 per frame."""
        return self.vae.config.scale_factor_temporal if _is_wan_vae(self.vae) else 1

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along height and width."""
        if _is_wan_vae(self.vae):
            return self.vae.config.scale_factor_spatial
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Native frame height in pixels (samplers' square `resolution` refers to it)."""
        return self.video_size[1]

    @property
    def num_frames(self) -> int:
        return self.video_size[0]

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for `num_frames` video frames."""
        tf = self.temporal_compression
        if tf > 1:
            if num_frames % tf != 1:
                raise ValueError(f"num_frames - 1 must be divisible by {tf} for this VAE, got {num_frames}")
            return (num_frames - 1) // tf + 1
        return num_frames

    def latent_shape(self, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, int, int, int]:
        """(C, T', H/f, W/f) latent shape of a `num_frames` x `height` x `width` video (default:
        native; a single `height` means a square frame only if the native frame is square)."""
        frames, native_h, native_w = self.video_size
        height = height or native_h
        width = width or (height if native_h == native_w else native_w)
        num_frames = num_frames or frames
        f = self.vae_scale_factor
        p_t, p_h, p_w = self.transformer.config.patch_size
        if height % (f * p_h) or width % (f * p_w):
            raise ValueError(f"frame size {height}x{width} must be divisible by {f * p_h}x{f * p_w} for this model")
        t = self.latent_frames(num_frames)
        if t % p_t:
            raise ValueError(f"{t} latent frames are not divisible by the temporal patch {p_t}")
        return (self.transformer.config.out_channels, t, height // f, width // f)

    # ------------------------------------------------------------------ text
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        inputs = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length",
                                max_length=self.max_sequence_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        device = self.text_encoder.device
        ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, D]
        # the pipeline keeps the first seq_len positions and zero-pads the rest
        seq_lens = mask.gt(0).sum(dim=1)
        keep = torch.arange(hidden.shape[1], device=device)[None, :] < seq_lens[:, None]  # [B, L]
        return torch.where(keep[..., None], hidden, torch.zeros_like(hidden))

    def encode_prompt(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
                      grad: bool = False, images=None) -> WanCond:
        """Encodes prompts (and the negative prompt for CFG; None disables it). [B] -> WanCond.
        Image-to-video models take the first frame(s) as `images` (or from `reference_images`)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompt got an empty prompt list")
        if images is not None and not self.image_channels:
            raise ValueError("this Wan checkpoint is text-to-video; an input image needs an image-to-video one")
        with torch.set_grad_enabled(grad):
            condition = None
            if self.image_channels:
                frames, height, width = self.video_size
                pixels = self.condition_images(prompts, images, height, width)
                condition = self.first_frame_condition(pixels.to(self.device), frames)
            embeds = self._encode(prompts)
            negatives = None
            if negative_prompt is not None:
                negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
                negatives = self._encode(negatives)
            return WanCond(embeds, negatives, condition)

    def first_frame_condition(self, images: torch.Tensor, num_frames: int) -> torch.Tensor:
        """First frames [B, 3, H, W] in [0, 1] -> the image-to-video condition [B, tf + z, T', H/f, W/f]:
        the first-frame mask (tf channels per latent frame) and the normalised latents of the frame
        followed by black frames, as `WanImageToVideoPipeline.prepare_latents`."""
        b, _, h, w = images.shape
        tf = self.vae.config.scale_factor_temporal
        video = torch.cat([images[:, :, None] * 2 - 1, images.new_zeros(b, 3, num_frames - 1, h, w)], dim=2)
        z = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode().float()
        mean, inv_std = wan_vae_stats(self.vae, z)
        z = (z - mean) * inv_std
        lh, lw = z.shape[-2:]
        mask = torch.zeros(b, 1, num_frames, lh, lw, device=z.device)
        mask[:, :, 0] = 1
        mask = torch.cat([mask[:, :, :1].repeat_interleave(tf, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(b, -1, tf, lh, lw).transpose(1, 2)  # [B, tf, T', h, w]
        return torch.cat([mask, z], dim=1)

    # ------------------------------------------------------------------ flow
    def _transformer(self, latents, sigma, embeds, module=None, condition=None):
        if self.coord_channels:
            latents = torch.cat([latents, coordinate_channels(latents)], 1)
        if condition is not None:  # image-to-video: [latents, mask + condition latents] on channels
            latents = torch.cat([latents, condition.to(latents.dtype)], 1)
        # timesteps stay fp32: Wan keeps its time embedder in fp32 (_keep_in_fp32_modules)
        module = module or self.transformer
        # each expert in its own dtype (a trainer may cast only `transformer` to bf16)
        dtype = self.dtype if module is self.transformer else next(module.parameters()).dtype
        out = module(hidden_states=latents.to(dtype), timestep=sigma * 1000, encoder_hidden_states=embeds.to(dtype),
                     return_dict=False)[0]
        return out.float()

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: WanCond,
                 guidance: float = 1.0, detach_uncond: bool = False) -> torch.Tensor:
        """Predicted velocity v = eps - x0 (fp32) with classifier-free guidance inside.

        latents: [B, C, T', H', W']; sigma: scalar or [B] in [0, 1]. CFG runs only for guidance > 1
        (as in diffusers); otherwise, or for a cond without negatives, the conditional branch.
        detach_uncond: the unconditional branch is a constant for autograd (Flow-GRPO's training
        forward); the value is unchanged.
        """
        b = latents.shape[0]
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(b)
        if self.transformer_2 is None:
            return self._guided(latents, sigma, cond, guidance, self.transformer, detach_uncond)
        # Wan2.2: the high-noise expert where t >= boundary (WanPipeline's rule), per sample
        high = (sigma * 1000) >= self.boundary_ratio * 1000
        # the pipeline runs CFG on both experts only when guidance > 1, the low one at guidance_2
        guidance_2 = (self.defaults.get("guidance_2") or guidance) if guidance > 1 else guidance
        if bool(high.all()):
            return self._guided(latents, sigma, cond, guidance, self.transformer, detach_uncond)
        if not bool(high.any()):
            return self._guided(latents, sigma, cond, guidance_2, self.transformer_2, detach_uncond)
        v = torch.empty(latents.shape, device=latents.device, dtype=torch.float32)
        for mask, g, module in ((high, guidance, self.transformer), (~high, guidance_2, self.transformer_2)):
            idx = mask.nonzero().squeeze(1)
            v[idx] = self._guided(latents[idx], sigma[idx], cond.index(idx), g, module, detach_uncond)
        return v

    def _guided(self, latents, sigma, cond: WanCond, guidance: float, module, detach_uncond: bool = False
                ) -> torch.Tensor:
        """One expert's velocity with CFG (guidance > 1 and negatives) inside."""
        condition = cond.condition
        if guidance <= 1.0 or cond.negative_prompt_embeds is None:
            return self._transformer(latents, sigma, cond.prompt_embeds, module, condition)
        condition = None if condition is None else torch.cat([condition, condition])
        v = self._transformer(torch.cat([latents, latents]), torch.cat([sigma, sigma]), cond.cfg_pair(), module,
                              condition)
        v_uncond, v_cond = v.chunk(2)
        if detach_uncond:
            v_uncond = v_uncond.detach()
        return v_uncond + guidance * (v_cond - v_uncond)

    # ------------------------------------------------------------------ pixels <-> latents
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, T', h, w] latents -> videos float32 in [0, 1], [B, 3, T, H, W]."""
        z = latents.to(self.vae.dtype)
        if _is_wan_vae(self.vae):
            mean, inv_std = wan_vae_stats(self.vae, z)
            videos = self.vae.decode(z / inv_std + mean, return_dict=False)[0]
        else:
            b, c, t, h, w = z.shape
            cfg = self.vae.config
            frames = z.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
            images = self.vae.decode(frames, return_dict=False)[0]
            videos = images.reshape(b, t, *images.shape[1:]).permute(0, 2, 1, 3, 4)
        return (videos.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, videos: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Videos in [0, 1], [B, 3, T, H, W] -> normalised latents (posterior mode unless `sample`)."""
        x = (videos * 2 - 1).to(self.vae.dtype)
        if _is_wan_vae(self.vae):
            dist = self.vae.encode(x).latent_dist
            z = dist.sample(generator) if sample else dist.mode()
            mean, inv_std = wan_vae_stats(self.vae, z)
            return ((z - mean) * inv_std).float()
        b, _, t, h, w = x.shape
        cfg = self.vae.config
        dist = self.vae.encode(x.permute(0, 2, 1, 3, 4).reshape(b * t, 3, h, w)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        z = (z.float() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
        return z.reshape(b, t, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, torch_dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", vae_dtype: torch.dtype = torch.float32,
                        **kwargs) -> "WanAdapter":
        """Loads a diffusers-layout Wan2.1 text-to-video checkpoint (local folder or hub id):
        `transformer/`, `vae/` (`AutoencoderKLWan`, or an `AutoencoderKL` used per frame),
        `text_encoder/` (`UMT5EncoderModel` or any class named in its config), `tokenizer/`.

        The VAE is kept in fp32 (`vae_dtype`) as diffusers recommends for Wan. A `genalign.json`
        beside `model_index.json` may set `max_sequence_length`, `video_size` [T, H, W], sampler
        `defaults`, and `"tokenizer": "clip"` (the offline CLIP tokenizer, no `tokenizer/` folder);
        otherwise the default shift is the scheduler's `flow_shift`/`shift` when present.
        """
        import diffusers
        import transformers
        from diffusers import WanTransformer3DModel

        root = Path(path_or_id)
        is_local = root.exists()
        if not is_local and (str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1):
            raise FileNotFoundError(f"model path not found: {path_or_id}")
        src = str(path_or_id)

        def local_json(*parts):
            file = root.joinpath(*parts)
            return json.loads(file.read_text()) if is_local and file.is_file() else {}

        settings = local_json(ADAPTER_SETTINGS_FILE)
        load = dict(torch_dtype=torch_dtype, **kwargs)
        transformer = WanTransformer3DModel.from_pretrained(src, subfolder="transformer", **load)
        index = local_json("model_index.json")
        if (index.get("image_encoder") or [None])[0] is not None:
            raise ValueError(f"{root}: Wan image-to-video with a CLIP image encoder (Wan2.1-I2V) is not supported; "
                             "image-to-video checkpoints without one (Wan2.2-I2V) are")
        if index.get("expand_timesteps"):
            raise ValueError(f"{root}: Wan2.2 TI2V-5B (expand_timesteps: per-token timesteps) is not supported; "
                             "Wan2.1, Wan2.2 A14B (two experts) and Wan2.2 I2V A14B are")
        boundary_ratio = index.get("boundary_ratio")
        has_expert_2 = (index.get("transformer_2") or [None])[0] is not None
        transformer_2 = (WanTransformer3DModel.from_pretrained(src, subfolder="transformer_2", **load)
                         if has_expert_2 and boundary_ratio is not None else None)
        vae_class = getattr(diffusers, local_json("vae", "config.json").get("_class_name", "AutoencoderKLWan"))
        vae = vae_class.from_pretrained(src, subfolder="vae", **{**load, "torch_dtype": vae_dtype})
        encoder_name = (local_json("text_encoder", "config.json").get("architectures") or ["UMT5EncoderModel"])[0]
        text_encoder = getattr(transformers, encoder_name).from_pretrained(src, subfolder="text_encoder", **load)
        max_sequence_length = settings.get("max_sequence_length", 512)
        tokenizer_spec = settings.get("tokenizer")
        if tokenizer_spec == "clip":
            from .clip_tokenizer import build_clip_tokenizer

            tokenizer = build_clip_tokenizer(max_sequence_length)
        elif tokenizer_spec is None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(src, subfolder="tokenizer")
        else:
            raise ValueError(f"{root / ADAPTER_SETTINGS_FILE}: unknown tokenizer {tokenizer_spec!r} (only 'clip')")
        defaults = dict(settings.get("defaults") or {})
        scheduler = local_json("scheduler", "scheduler_config.json")
        if "shift" not in defaults and (scheduler.get("flow_shift") or scheduler.get("shift")):
            defaults["shift"] = float(scheduler.get("flow_shift") or scheduler.get("shift"))
        model = cls(transformer, vae, text_encoder, tokenizer, max_sequence_length=max_sequence_length,
                    video_size=settings.get("video_size", WAN_VIDEO_SIZE), defaults=defaults,
                    tokenizer_spec=tokenizer_spec, coord_channels=bool(settings.get("coord_channels", False)),
                    transformer_2=transformer_2, boundary_ratio=boundary_ratio if transformer_2 is not None else None)
        return model.to(device).eval().requires_grad_(False)

    def save_pretrained(self, directory: str | Path, settings: dict | None = None) -> Path:
        """Writes the components in diffusers' WanPipeline layout (`model_index.json`, a
        `FlowMatchEulerDiscreteScheduler` with the default shift, `genalign.json` settings)."""
        import diffusers
        from diffusers import FlowMatchEulerDiscreteScheduler

        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(root / "transformer")
        if self.transformer_2 is not None:
            self.transformer_2.save_pretrained(root / "transformer_2")
        self.vae.save_pretrained(root / "vae")
        self.text_encoder.save_pretrained(root / "text_encoder")
        FlowMatchEulerDiscreteScheduler(shift=self.defaults["shift"]).save_pretrained(root / "scheduler")
        tokenizer_entry = [None, None]
        if self.tokenizer_spec is None:
            self.tokenizer.save_pretrained(root / "tokenizer")
            tokenizer_entry = ["transformers", type(self.tokenizer).__name__]
        index = {"_class_name": "WanImageToVideoPipeline" if self.image_channels else "WanPipeline",
                 "_diffusers_version": diffusers.__version__,
                 "boundary_ratio": self.boundary_ratio, "expand_timesteps": False,
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 "text_encoder": ["transformers", type(self.text_encoder).__name__],
                 "tokenizer": tokenizer_entry,
                 "transformer": ["diffusers", type(self.transformer).__name__],
                 "transformer_2": (["diffusers", type(self.transformer_2).__name__] if self.transformer_2 is not None
                                   else [None, None]),
                 "vae": ["diffusers", type(self.vae).__name__],
                 **({"image_encoder": [None, None], "image_processor": [None, None]} if self.image_channels else {})}
        (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        all_settings = {"max_sequence_length": self.max_sequence_length, "video_size": list(self.video_size),
                        "defaults": self.defaults,
                        **({"tokenizer": self.tokenizer_spec} if self.tokenizer_spec else {}),
                        **({"coord_channels": True} if self.coord_channels else {}), **(settings or {})}
        (root / ADAPTER_SETTINGS_FILE).write_text(json.dumps(all_settings, indent=2) + "\n")
        return root
