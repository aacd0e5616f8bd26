"""Tiny random adapters of every diffusers family, built from configs (tests and benchmarks).

Each builder returns a seeded, freshly initialised adapter whose components are the real
classes of that family's checkpoints at toy width (one or two layers, 8-32 channels), small
enough for CPU tests against the family's diffusers pipeline. Tokenizers are offline: the CLIP
BPE rebuilt from open_clip's merges (clip_tokenizer.py) and the vocabulary-free ByT5 tokenizer
for T5-style encoders, so nothing is fetched from a hub.
"""

from __future__ import annotations

import torch

TEXT_LENGTH = 16  # tokens of every tiny tokenizer (CLIP model_max_length, T5 max_sequence_length)


def tiny_clip_text(width: int = 32, seed: int | None = None, max_length: int = TEXT_LENGTH):
    """`CLIPTextModel` (pooled output) with the offline CLIP tokenizer of `max_length` tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from .clip_tokenizer import build_clip_tokenizer

    if seed is not None:
        torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=49407, hidden_act="gelu")
    return CLIPTextModel(config), build_clip_tokenizer(max_length)


def tiny_t5(width: int = 32):
    """`T5EncoderModel` with the ByT5 tokenizer (bytes, no vocabulary file)."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    config = T5Config(vocab_size=384, d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
    return T5EncoderModel(config), ByT5Tokenizer()


def tiny_image_vae(latent_channels: int = 4, scaling_factor: float = 0.9, shift_factor: float = 0.1):
    """`AutoencoderKL` with 2x spatial compression (FLUX-style scaling and shift factors)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=8, mid_block_add_attention=False,
                         sample_size=16, scaling_factor=scaling_factor, shift_factor=shift_factor)


def flux_scheduler():
    """FLUX.1-dev's scheduler config: dynamic (exponential) shift, mu from the token count."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def tiny_flux(seed: int = 0, kontext: bool = False, guidance_embeds: bool = True):
    """FLUX.1-dev (or Kontext) at toy size: 16 px native images, 8x8 latents of 4 channels,
    2x2 packed into 16 tokens; one double and one single block."""
    from diffusers import FluxTransformer2DModel

    from .flux import FluxAdapter, FluxKontextAdapter

    torch.manual_seed(seed)
    clip, clip_tokenizer = tiny_clip_text(32)
    t5, t5_tokenizer = tiny_t5(32)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))
    components = dict(scheduler=flux_scheduler(), vae=tiny_image_vae(), text_encoder=clip, tokenizer=clip_tokenizer,
                      text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
    cls = FluxKontextAdapter if kontext else FluxAdapter
    defaults = {"num_steps": 4, "resolution": 16}
    return cls(components, defaults=defaults, max_sequence_length=TEXT_LENGTH).eval().requires_grad_(False)


def tiny_wan22(seed: int = 0, boundary_ratio: float = 0.875, i2v: bool = False):
    """Wan2.2 A14B at toy size: two `WanTransformer3DModel` experts (high / low noise, different
    weights), `AutoencoderKLWan` (2x time, 2x space), UMT5 + ByT5 tokenizer; 5 frames of 16 px.
    i2v: the image-to-video variant (input widened by the 2-channel first-frame mask and the
    4-channel condition latents)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    from .wan import WanAdapter

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0],
                           scale_factor_temporal=2, scale_factor_spatial=2)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=384, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, relative_attention_num_buckets=8))
    experts = [WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                     in_channels=10 if i2v else 4,
                                     out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=1,
                                     rope_max_seq_len=32) for _ in range(2)]
    # Wan2.2-T2V-A14B's sampler defaults: 40 steps, guidance 4.0 (high noise) / 3.0 (low noise)
    return WanAdapter(experts[0], vae, text_encoder, ByT5Tokenizer(), max_sequence_length=TEXT_LENGTH,
                      video_size=(5, 16, 16), defaults={"num_steps": 4, "guidance": 4.0, "guidance_2": 3.0},
                      transformer_2=experts[1], boundary_ratio=boundary_ratio).eval().requires_grad_(False)


def tiny_qwen_tokenizer():
    """A byte-level `Qwen2Tokenizer` (the 256 byte symbols, no merges) with Qwen's chat and
    vision special tokens: every prompt tokenises as in Qwen, one token per byte."""
    from transformers import Qwen2Tokenizer

    from .clip_tokenizer import _bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate(_bytes_to_unicode())}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    return tokenizer


def tiny_qwen_vl(tokenizer, width: int = 32):
    """`Qwen2_5_VLForConditionalGeneration`: one text layer (multimodal RoPE) and one vision block."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 2, 4]},
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=width,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    return Qwen2_5_VLForConditionalGeneration(config)


def tiny_qwen_vae(z_dim: int = 4):
    """`AutoencoderKLQwenImage` with 2x spatial compression and per-channel latent statistics."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=8, z_dim=z_dim, dim_mult=[1, 2], num_res_blocks=1,
                                  temperal_downsample=[False], latents_mean=[0.1, -0.2, 0.3, 0.0][:z_dim],
                                  latents_std=[1.5, 0.8, 1.2, 1.0][:z_dim])


def qwen_image_scheduler():
    """Qwen-Image's scheduler config: exponential dynamic shift (base log 3 .. max log 3 over
    256..8192 tokens), shift_terminal 0.02."""
    import math

    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=math.log(3), max_image_seq_len=8192,
                                           max_shift=math.log(3), shift=1.0, shift_terminal=0.02,
                                           use_dynamic_shifting=True, time_shift_type="exponential")


def tiny_qwen_image(seed: int = 0):
    """Qwen-Image at toy size: 16 px images, 8x8 latents of 4 channels packed into 16 tokens."""
    from diffusers import QwenImageTransformer2DModel

    from .qwen_image import QwenImageAdapter

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    text_encoder = tiny_qwen_vl(tokenizer)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6))
    components = dict(scheduler=qwen_image_scheduler(), vae=tiny_qwen_vae(), text_encoder=text_encoder,
                      tokenizer=tokenizer, transformer=transformer)
    return QwenImageAdapter(components, defaults={"num_steps": 4, "resolution": 16},
                            max_sequence_length=512).eval().requires_grad_(False)


def tiny_qwen_image_edit(seed: int = 0, reference_area: int = 1024 * 1024, plus: bool = False):
    """Qwen-Image-Edit at toy size: the Qwen-Image toy's transformer and VL encoder, a Qwen2-VL
    processor, and an 8x VAE (no channel growth) so the pipeline's 1024 x 1024 input image encodes
    in seconds; 32 px native output images (4x4 latents, 4 tokens)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from .qwen_image import QwenImageEditAdapter, QwenImageEditPlusAdapter

    base = tiny_qwen_image(seed)
    torch.manual_seed(seed + 1)
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, False, False], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                 latents_std=[1.5, 0.8, 1.2, 1.0])
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=base.tokenizer,
                                 video_processor=Qwen2VLVideoProcessor())
    components = dict(scheduler=base.scheduler, vae=vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                      processor=processor, transformer=base.transformer)
    defaults = {"num_steps": 4, "resolution": 32, "reference_area": reference_area}
    cls = QwenImageEditPlusAdapter if plus else QwenImageEditAdapter
    return cls(components, defaults=defaults, max_sequence_length=512).eval().requires_grad_(False)


# a Qwen3-style chat template (one user turn; enable_thinking=False adds the empty think block)
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def tiny_z_image(seed: int = 0, turbo: bool = False):
    """Z-Image (or Z-Image-Turbo: fixed shift 3, guidance 0) at toy size: 16 px images, 8x8
    latents of 4 channels; a two-layer Qwen3 encoder with the byte-level tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from .z_image import ZImageAdapter

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=16, max_position_embeddings=512))
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                                           axes_dims=[4, 6, 6], axes_lens=[256, 32, 32])
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False) if turbo else
                 FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=256, max_image_seq_len=4096))
    components = dict(scheduler=scheduler, vae=tiny_image_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                      transformer=transformer)
    defaults = {"num_steps": 4, "resolution": 16, "guidance": 0.0 if turbo else 5.0}
    return ZImageAdapter(components, defaults=defaults, max_sequence_length=64).eval().requires_grad_(False)


def tiny_hunyuan_video(seed: int = 0):
    """HunyuanVideo at toy size: 5 frames of 32 px (2 x 4 x 4 latents of 4 channels), one dual-
    and one single-stream block, a two-layer Llama with the byte-level tokenizer, a 77-token CLIP."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
    from transformers import LlamaConfig, LlamaModel

    from .hunyuan_video import HunyuanVideoAdapter

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    text_encoder = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                          max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id))
    clip, clip_tokenizer = tiny_clip_text(32, max_length=77)
    transformer = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=8, num_layers=1, num_single_layers=1,
                                                 num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                 text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(2, 2, 4))
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                    layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=8,
                                    temporal_compression_ratio=4, mid_block_add_attention=True)
    components = dict(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                      scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip, tokenizer_2=clip_tokenizer)
    # the byte-level tokenizer spells the pipeline's 510-byte template in 510 tokens (Llama's: ~100), so
    # 480 text tokens after the template's 95 cropped ones leave room to pad short prompts
    return HunyuanVideoAdapter(components, defaults={"num_steps": 4}, max_sequence_length=480,
                               video_size=(5, 32, 32)).eval().requires_grad_(False)


# a chat template over typed content parts (the processor's message format of Flux2Pipeline)
PARTS_CHAT_TEMPLATE = (
    "{% for message in messages %}[{{ message['role'] }}]{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}[/{{ message['role'] }}]{% endfor %}")


def _tiny_flux2_parts(seed: int):
    """(VAE with random batch-norm statistics, scheduler) shared by the FLUX.2 toys."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                             norm_num_groups=8, sample_size=32, mid_block_add_attention=False)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(16) * 0.1)
        vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    return vae, FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")


def tiny_flux2(seed: int = 0):
    """FLUX.2 [dev] at toy size: as the klein toy, with a guidance embedding and a three-layer
    `Mistral3ForConditionalGeneration` (a one-layer Pixtral vision tower) read at layers (1, 2, 3),
    the byte-level tokenizer with a typed-parts chat template standing in for the processor."""
    from diffusers import Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from .flux2 import Flux2Adapter

    vae, scheduler = _tiny_flux2_parts(seed)
    tokenizer = tiny_qwen_tokenizer()
    tokenizer.chat_template = PARTS_CHAT_TEMPLATE
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=1024),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, patch_size=14, image_size=56, head_dim=8),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image_pad|>"), spatial_merge_size=2,
        vision_feature_layer=-1))
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                          guidance_embeds=True)
    components = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      transformer=transformer)
    # the system message is 168 bytes: 256 byte tokens keep the prompt
    return Flux2Adapter(components, defaults={"num_steps": 4, "resolution": 32}, max_sequence_length=256,
                        text_encoder_out_layers=(1, 2, 3)).eval().requires_grad_(False)


def tiny_flux2_klein(seed: int = 0, is_distilled: bool = False):
    """FLUX.2 [klein] at toy size: 32 px images -> 16x16 VAE latents of 4 channels -> 8x8 patchified
    latents of 16 (64 tokens); a three-layer Qwen3 causal LM read at layers (1, 2, 3); random
    batch-norm statistics in the VAE so the normalisation is exercised."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .flux2 import Flux2KleinAdapter

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                                head_dim=8, max_position_embeddings=512))
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                             norm_num_groups=8, sample_size=32, mid_block_add_attention=False)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(16) * 0.1)
        vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                          guidance_embeds=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
    components = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      transformer=transformer)
    return Flux2KleinAdapter(components, defaults={"num_steps": 4, "resolution": 32}, max_sequence_length=64,
                             text_encoder_out_layers=(1, 2, 3), is_distilled=is_distilled).eval().requires_grad_(False)
