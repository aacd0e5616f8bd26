"""The ShapesWorld toy model: a real SD3-family model, small enough to train and sample on a CPU.

Components are the classes of real SD3 checkpoints (`SD3Transformer2DModel`, `AutoencoderKL`,
two `CLIPTextModelWithProjection` slots with the exact CLIP BPE tokenizer, no T5), so the toy
runs through exactly the adapter that serves SD3.5 weights. Choices, and why:

- 64x64 RGB images, a 4x VAE with 4 latent channels (16x16 latents) and transformer patch 2:
  64 image tokens of 8x8 pixels each. Token count is the cost on a CPU; objects of 16-26 px
  span 2-3 tokens, which is enough for shapes to be learnable.
- CLIP context of 16 tokens (ShapesWorld captions are at most 13) and no T5 slot
  (`max_sequence_length` 0, so the diffusers pipeline appends no zero tokens either).
- The second CLIP slot (SD3's CLIP-G) is a 1-layer, 16-wide encoder: diffusers' pipeline needs
  the slot; the first slot carries most of the text capacity.
- The VAE has no mid-block attention: fully convolutional, so it trains on crops and decodes fast.
- Shipped weights live in `samplers/models/weights/shapesworld/`, made by `align pretrain-toy`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .sd3 import SD3Adapter

SHAPESWORLD_DIR = Path(__file__).parent / "weights" / "shapesworld"
# weights_checksum() of the shipped weights (`align pretrain-toy`, seed 0, default settings).
SHIPPED_SHA256 = "40d7eba96f7a9f47e98084264d1a299ea82617b62c9fd040968abaef0579b558"
TOKENIZER_MAX_LENGTH = 16
# Sampler defaults of the shipped checkpoint (Flow-GRPO's training setting: 10 steps, CFG on).
DEFAULTS = {"num_steps": 10, "guidance": 4.5, "shift": 3.0}

# Component sizes. "shapesworld" is the shipped model; "test" is a smaller one for unit tests.
SIZES = {
    "shapesworld": dict(latent=16, patch=2, layers=4, heads=3, head_dim=32, vae_channels=(8, 16, 32),
                        text_width=48, text_layers=2, text2_width=16, text2_layers=1),
    "test": dict(latent=8, patch=2, layers=1, heads=2, head_dim=8, vae_channels=(8, 16),
                 text_width=16, text2_width=8, text_layers=1, text2_layers=1),
}


def _clip_text_encoder(width: int, layers: int, heads: int, projection: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                            num_hidden_layers=layers, num_attention_heads=heads, projection_dim=projection,
                            max_position_embeddings=TOKENIZER_MAX_LENGTH, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=49407, hidden_act="gelu")
    return CLIPTextModelWithProjection(config)


def toy_components(size: str = "shapesworld", seed: int = 0) -> SD3Adapter:
    """A freshly initialised (seeded) toy SD3 model of the given size, built from configs."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from .clip_tokenizer import build_clip_tokenizer

    s = SIZES[size]
    torch.manual_seed(seed)
    width1, width2 = s["text_width"], s["text2_width"]
    proj1, proj2 = width1 // 3 * 2, width2
    encoders = [_clip_text_encoder(width1, s["text_layers"], 4 if width1 % 4 == 0 else 2, proj1),
                _clip_text_encoder(width2, s["text2_layers"], 2, proj2)]
    n_down = len(s["vae_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n_down,
                        up_block_types=("UpDecoderBlock2D",) * n_down, block_out_channels=s["vae_channels"],
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, mid_block_add_attention=False,
                        sample_size=s["latent"] * 2 ** (n_down - 1), scaling_factor=1.0, shift_factor=0.0)
    transformer = SD3Transformer2DModel(
        sample_size=s["latent"], patch_size=s["patch"], in_channels=4, out_channels=4, num_layers=s["layers"],
        attention_head_dim=s["head_dim"], num_attention_heads=s["heads"], joint_attention_dim=width1 + width2,
        caption_projection_dim=s["heads"] * s["head_dim"], pooled_projection_dim=proj1 + proj2,
        pos_embed_max_size=s["latent"] // s["patch"])
    tokenizer = build_clip_tokenizer(TOKENIZER_MAX_LENGTH)
    return SD3Adapter(transformer, vae, encoders, [tokenizer, tokenizer], max_sequence_length=0,
                      defaults=DEFAULTS)


def load_shapesworld(device: str | torch.device = "cpu", path: str | Path | None = None, **kwargs) -> SD3Adapter:
    """The shipped, pretrained ShapesWorld model (or one saved by `align pretrain-toy --out`)."""
    root = Path(path) if path else SHAPESWORLD_DIR
    if not (root / "transformer").is_dir():
        raise FileNotFoundError(
            f"ShapesWorld weights not found in {root}; rebuild them with `align pretrain-toy --out {root}`")
    return SD3Adapter.from_pretrained(root, device=device, **kwargs)


def weights_checksum(root: str | Path = SHAPESWORLD_DIR) -> str:
    """SHA-256 over every weight file (sorted by relative path) of a saved model folder."""
    root = Path(root)
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.safetensors")):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()
