"""Qwen-Image family adapter (`QwenImagePipeline`): MMDiT on a Qwen2.5-VL text encoder.

The same calls as every adapter, on unpacked image latents [B, C, H/8, W/8]:

    cond = model.encode_prompt(prompts)                 # QwenImageCond
    v = model.velocity(latents, sigma, cond, guidance)  # packing + true CFG inside, fp32 out
    images = model.decode(latents)                      # float in [0, 1], (B, 3, H, W)
    sigmas = model.sigmas(num_steps, height, width)     # the pipeline's dynamic-shift schedule

Following `QwenImagePipeline` (diffusers) exactly:
- prompt: the pipeline's chat template around each prompt, the VL model's last hidden state,
  the template's first `prompt_template_encode_start_idx` tokens dropped, each prompt's valid
  tokens zero-padded to the batch's longest (with a mask, None when nothing is padded), cut at
  `max_sequence_length` (512 in the pipeline's call).
- guidance: true CFG only with a negative prompt and a scale > 1 (the pipeline's
  `true_cfg_scale`; here `guidance`), followed by the pipeline's norm-preserving rescale: the
  guided velocity of every token is scaled back to the norm of the conditional one.
- latents packed 2x2 into tokens as FLUX (`flux.pack_latents`), `img_shapes` per sample;
  timestep sigma * 1000 / 1000 in fp32; schedule linspace(1, 1/S, S) with the exponential shift
  of mu from the token count (the checkpoint's scheduler config: base/max shift, shift_terminal).
- VAE: `AutoencoderKLQwenImage` (one frame), latents normalised by `latents_mean` / `latents_std`.

Qwen-Image-Edit (`QwenImageEditPipeline`, `QwenImageEditAdapter`) takes the input image through
the shared image path (image_cond.py) twice, as the pipeline does: into the VL encoder with the
edit chat template (the processor's image tokens inside the prompt), and as VAE latents appended
to the image tokens (a second `img_shapes` entry); only the generated tokens' velocity is kept.
The image is resized to the pipeline's area (1024 x 1024 at the image's aspect ratio, sides
rounded to 32 px; `defaults["reference_area"]`) unless it already has that size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .common import BatchedCond
from .flux import pack_latents, pipeline_timestep, unpack_latents
from .image_cond import ImageConditioning, resize_images
from .pipeline_adapter import PipelineAdapter, as_prompt_list, negatives_for
from .wan import wan_vae_stats


@dataclass
class QwenImageCond(BatchedCond):
    """prompt_embeds [B, L, D] (zero-padded), prompt_mask [B, L] long (None: nothing padded),
    the negatives the same way (None without CFG; their L may differ), image_latents [B, C, h, w]
    (the input image of Qwen-Image-Edit, None for text-to-image)."""

    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    negative_prompt_mask: torch.Tensor | None = None
    image_latents: torch.Tensor | None = None  # [B, C, h, w] the edit image's latents (Qwen-Image-Edit)


def norm_preserving_cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG: v = u + s (c - u), rescaled per token to the norm of c over the
    last (channel) axis, as `QwenImagePipeline` applies it to packed tokens [B, N, D]."""
    guided = v_uncond + scale * (v_cond - v_uncond)
    return guided * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))


class QwenImageAdapter(PipelineAdapter):
    """Qwen-Image: `QwenImageTransformer2DModel` + `AutoencoderKLQwenImage` + Qwen2.5-VL."""

    family = "qwen_image"
    pipeline_class_name = "QwenImagePipeline"
    component_names = ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")
    # QwenImagePipeline's defaults: 50 steps, true CFG 4.0 with a negative prompt, 1024 px
    base_defaults = {"num_steps": 50, "guidance": 4.0, "resolution": 1024}
    settings_keys = ("max_sequence_length",)
    # the strongest peer framework's Qwen-Image LoRA targets: image / text stream attention
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

    def __init__(self, components: dict, defaults: dict | None = None, max_sequence_length: int = 512):
        super().__init__(components, defaults, max_sequence_length=max_sequence_length)
        self._template = None  # (chat template, tokens dropped), read from the pipeline class

    # ------------------------------------------------------------------ shapes
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(C, H/f, W/f) unpacked latents of a `height` x `width` image."""
        f = self.vae_scale_factor * 2
        height, width = self.image_hw(height, width, f)
        return (self.transformer.config.in_channels // 4, height // self.vae_scale_factor,
                width // self.vae_scale_factor)

    def _schedule_inputs(self, num_steps: int, height, width, **kwargs):
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        _, h, w = self.latent_shape(height, width)
        cfg = self.scheduler.config
        mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return np.linspace(1.0, 1 / num_steps, num_steps), mu

    # ------------------------------------------------------------------ text
    def _chat_template(self) -> tuple[str, int]:
        """The pipeline's chat template and the number of its leading tokens dropped."""
        if self._template is None:
            self._template = _pipeline_template(self.pipeline_class())
        return self._template

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        template, drop = self._chat_template()
        tokens = self.tokenizer([template.format(p) for p in prompts], max_length=1024 + drop, padding=True,
                                truncation=True, return_tensors="pt").to(self.text_encoder.device)
        hidden = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                   output_hidden_states=True).hidden_states[-1]
        return pad_valid_tokens(hidden, tokens.attention_mask, drop, self.max_sequence_length)

    def encode_prompt(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      grad: bool = False, images: Any = None) -> QwenImageCond:
        """Prompts [B] (and negatives for true CFG) -> QwenImageCond. Text-to-image: `images`
        must be None (Qwen-Image-Edit takes an image)."""
        if images is not None:
            raise ValueError("QwenImagePipeline is text-to-image; Qwen-Image-Edit takes the input image")
        prompts = as_prompt_list(prompts)
        with torch.set_grad_enabled(grad):
            embeds, mask = self._encode(prompts)
            neg = (None, None)
            if negative_prompt is not None:
                neg = self._encode(negatives_for(negative_prompt, len(prompts)))
        return QwenImageCond(embeds, mask, *neg)

    # ------------------------------------------------------------------ flow
    def _transformer(self, tokens, timestep, embeds, mask, img_shapes):
        out = self.transformer(hidden_states=tokens.to(self.dtype), timestep=timestep.to(self.dtype), guidance=None,
                               encoder_hidden_states_mask=mask, encoder_hidden_states=embeds.to(self.dtype),
                               img_shapes=img_shapes, return_dict=False)[0]
        return out.float()

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: QwenImageCond,
                 guidance: float = 1.0, detach_uncond: bool = False) -> torch.Tensor:
        """v = eps - x0 (fp32) at unpacked latents [B, C, H, W]; true CFG with the norm-preserving
        rescale for guidance > 1 and a cond with negatives (else the conditional branch).
        detach_uncond: the negative branch is a constant for autograd (run without a graph)."""
        b, _, h, w = latents.shape
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(b)
        tokens = pack_latents(latents)
        n = tokens.shape[1]
        shapes = [(1, h // 2, w // 2)]
        if cond.image_latents is not None:  # Qwen-Image-Edit: the input image's tokens after ours
            ref = cond.image_latents
            tokens = torch.cat([tokens, pack_latents(ref.to(tokens.dtype))], dim=1)
            shapes.append((1, ref.shape[2] // 2, ref.shape[3] // 2))
        img_shapes = [shapes] * b
        timestep = pipeline_timestep(sigma)
        v = self._transformer(tokens, timestep, cond.prompt_embeds, cond.prompt_mask, img_shapes)[:, :n]
        if guidance > 1 and cond.negative_prompt_embeds is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_uncond):
                v_neg = self._transformer(tokens, timestep, cond.negative_prompt_embeds, cond.negative_prompt_mask,
                                          img_shapes)[:, :n]
            v = norm_preserving_cfg(v, v_neg, guidance)
        return unpack_latents(v, h, w)

    # ------------------------------------------------------------------ pixels <-> latents
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] latents -> images float32 in [0, 1], [B, 3, H, W]."""
        z = latents[:, :, None].to(self.vae.dtype)
        mean, inv_std = wan_vae_stats(self.vae, z)
        images = self.vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Images in [0, 1], [B, 3, H, W] -> normalised latents [B, C, h, w] (mode unless `sample`),
        (z - mean) / std as the edit pipeline's `_encode_vae_image`."""
        return self._vae_latents(images * 2 - 1, sample, generator)

    def _vae_latents(self, pixels: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Pixels in [-1, 1], [B, 3, H, W] -> normalised latents [B, C, h, w]."""
        dist = self.vae.encode(pixels[:, :, None].to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        mean, inv_std = wan_vae_stats(self.vae, z)
        std = torch.tensor(self.vae.config.latents_std).view(inv_std.shape).to(z.device, z.dtype)
        return ((z - mean) / std).float()[:, :, 0]


class QwenImageEditAdapter(ImageConditioning, QwenImageAdapter):
    """Qwen-Image-Edit: Qwen-Image with the input image in the VL prompt and as extra latent tokens.

    `encode_prompt(prompts, images=...)` (or `reference_images`) is required: every prompt edits
    an image. `processor` is the pipeline's `Qwen2VLProcessor`.
    """

    family = "qwen_image_edit"
    pipeline_class_name = "QwenImageEditPipeline"
    component_names = ("scheduler", "vae", "text_encoder", "tokenizer", "processor", "transformer")
    base_defaults = {**QwenImageAdapter.base_defaults, "reference_area": 1024 * 1024}
    image_required = True

    def reference_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the pipeline resizes an input image of this size to."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        w, h, _ = calculate_dimensions(self.defaults["reference_area"], width / height)
        return int(h), int(w)

    def _encode(self, prompts: list[str], images=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        template, drop = self._chat_template()
        inputs = self.processor(text=[template.format(p) for p in prompts], images=images, padding=True,
                                return_tensors="pt").to(self.text_encoder.device)
        hidden = self.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                                   output_hidden_states=True).hidden_states[-1]
        # the edit pipeline keeps every token (its encode_prompt does not cut at max_sequence_length)
        return pad_valid_tokens(hidden, inputs["attention_mask"], drop, None)

    def encode_prompt(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      grad: bool = False, images: Any = None) -> QwenImageCond:
        """Prompts [B] with their input images (one for all, or one each) -> QwenImageCond with
        the VL embeddings of (template, image, prompt) and the image's latents."""
        prompts = as_prompt_list(prompts)
        pixels = self.condition_images(prompts, images)  # [B, 3, H, W] in [0, 1]
        pixels = resize_images(pixels, *self.reference_size(*pixels.shape[-2:]))
        # the VL processor reads 8-bit RGB images, as the pipeline hands it PIL images
        pil = [to_pil(image) for image in pixels]
        with torch.set_grad_enabled(grad):
            embeds, mask = self._encode(prompts, pil)
            neg = (None, None)
            if negative_prompt is not None:
                neg = self._encode(negatives_for(negative_prompt, len(prompts)), pil)
            image_latents = self.encode(pixels.to(self.device))
        return QwenImageCond(embeds, mask, *neg, image_latents=image_latents)


class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    """Qwen-Image-Edit-2509 / Plus (`QwenImageEditPlusPipeline`): the input image reaches the VL
    encoder at the pipeline's 384 x 384 area ("Picture 1: ..." before the prompt) and the VAE at
    its 1024 x 1024 area, each resized by the pipeline's own image processor (Lanczos on the 8-bit
    image). One input image per prompt (the pipeline's several images per prompt are not covered).
    """

    family = "qwen_image_edit_plus"
    pipeline_class_name = "QwenImageEditPlusPipeline"
    base_defaults = {**QwenImageAdapter.base_defaults, "reference_area": 1024 * 1024, "condition_area": 384 * 384}

    def encode_prompt(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      grad: bool = False, images: Any = None) -> QwenImageCond:
        from diffusers.image_processor import VaeImageProcessor
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

        prompts = as_prompt_list(prompts)
        pil = [to_pil(image) for image in self.condition_images(prompts, images)]
        processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)

        def area_size(image, area):
            w, h = calculate_dimensions(area, image.size[0] / image.size[1])[:2]
            return int(h), int(w)

        vl_images = [processor.resize(im, *area_size(im, self.defaults["condition_area"])) for im in pil]
        vae_pixels = [processor.preprocess(im, *area_size(im, self.defaults["reference_area"])) for im in pil]
        if len({tuple(v.shape) for v in vae_pixels}) != 1:
            raise ValueError("the input images of one batch must share an aspect ratio (one latent size)")
        texts = ["Picture 1: <|vision_start|><|image_pad|><|vision_end|>" + p for p in prompts]
        with torch.set_grad_enabled(grad):
            embeds, mask = self._encode(texts, vl_images)
            neg = (None, None)
            if negative_prompt is not None:
                negatives = ["Picture 1: <|vision_start|><|image_pad|><|vision_end|>" + n
                             for n in negatives_for(negative_prompt, len(prompts))]
                neg = self._encode(negatives, vl_images)
            image_latents = self._vae_latents(torch.cat(vae_pixels).to(self.device))
        return QwenImageCond(embeds, mask, *neg, image_latents=image_latents)


def to_pil(image: torch.Tensor):
    """[3, H, W] in [0, 1] -> an RGB PIL image (rounded to 8 bits)."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def _pipeline_template(pipeline_class) -> tuple[str, int]:
    """(prompt_template_encode, prompt_template_encode_start_idx) a Qwen pipeline sets in its
    __init__, read from a components-free instance so the adapter never copies the text."""
    import inspect

    names = [n for n in inspect.signature(pipeline_class.__init__).parameters if n != "self"]
    pipe = pipeline_class(**{name: None for name in names})
    return pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx


def pad_valid_tokens(hidden: torch.Tensor, mask: torch.Tensor, drop: int,
                     max_sequence_length: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, L, D] hidden states and [B, L] attention mask -> each row's valid tokens after the
    first `drop`, zero-padded to the longest and cut at `max_sequence_length` (None: kept whole): (embeds
    [B, L', D], mask [B, L'] long, None when no row is padded). QwenImagePipeline's encoding."""
    rows = [h[m.bool()][drop:] for h, m in zip(hidden, mask)]
    length = max(r.shape[0] for r in rows)
    embeds = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], r.shape[1])]) for r in rows])
    valid = torch.stack([torch.arange(length, device=hidden.device) < r.shape[0] for r in rows]).long()
    if max_sequence_length is not None:
        embeds, valid = embeds[:, :max_sequence_length], valid[:, :max_sequence_length]
    return embeds, (None if bool(valid.all()) else valid)
