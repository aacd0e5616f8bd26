"""The ShapesWorld-Video toy model: a Wan-family text-to-video model small enough for a CPU.

Components, and why:

- `WanTransformer3DModel` (the class of real Wan2.1 checkpoints), so the toy runs through the same
  `WanAdapter` that serves Wan weights. Patch (2, 2, 2) over 8 latent frames of 16x16: 4 x 8 x 8 =
  256 tokens per clip, each covering 2 frames x 8x8 px (the image toy's 8x8 px token) and emitting
  4 x 2 x 2 x 2 = 32 latent values; width 96 (3 heads x 32), 4 layers, FFN 384. Token count is the
  cost on a CPU. Measured alternatives (1 thread, batch 32, contended machine): patch (2, 4, 4) at
  width 64 (0.9 s/step) plateaued at flow loss ~0.72 (each 64-wide token had to emit 128 values);
  patch (1, 4, 4) at width 128 x 6 layers (1.2-1.4 s/step) matched this one's loss but its frames
  came out mutually incoherent after 300 steps; (1, 2, 2) (512 tokens) costs ~3 s/step.
- Coordinate input channels (`WanAdapter(coord_channels=True)`: the t, y and x of each latent
  voxel appended to the 4 latent channels, `in_channels` 7). Wan knows positions only through
  relative RoPE, which on near-pure noise is translation-equivariant; without the channels the
  toy could not make an object drift the way its caption says (held-out direction 0.04). In a
  one-object left/right ablation (2,000 steps of 16, timestep shift 3) sampled clips moved the
  captioned way 100% of the time with them and 44% without.
- A per-frame VAE instead of `AutoencoderKLWan` (documented deviation, see samplers/models/wan.py):
  the image toy's trained `AutoencoderKL` (64 px <-> 4x16x16), frozen and applied frame by frame.
  ShapesWorld-Video frames are ShapesWorld-style images, which it already reconstructs; no video
  VAE has to be trained on 2 CPU cores.
- A CLIP text encoder in the UMT5 slot with the exact offline CLIP BPE (no tokenizer files ship),
  initialised from the image toy's trained text encoder (colours and shapes known; motion words are
  learnt in pretraining). 16 tokens (captions are at most 15).
- Shipped weights live in `samplers/models/weights/shapesworld_video/` (made by
  `align.pretrain_video_toy`), in diffusers' WanPipeline layout with a `model_index.json`, so
  `samplers.models.load_model(<that folder>)` loads them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .wan import WanAdapter

VIDEO_DIR = Path(__file__).parent / "weights" / "shapesworld_video"
# weights_checksum() of the shipped weights (`python -m align.pretrain_video_toy`: seed 0, default
# settings, 2 threads; another thread count may change the float results and so the checksum).
SHIPPED_SHA256 = "e2494c1067750c746ca02839f4a4e8f01029239dc3751f18de7a078533d0838c"
TOKENIZER_MAX_LENGTH = 16
NUM_FRAMES, FRAME_SIZE = 8, 64
DEFAULTS = {"num_steps": 10, "guidance": 4.5, "shift": 3.0}

SIZES = {
    "shapesworld_video": dict(patch=(2, 2, 2), heads=3, head_dim=32, layers=4, ffn=384, freq=64, coord=True,
                              text_width=48, text_layers=2, vae_channels=(8, 16, 32), frames=NUM_FRAMES,
                              frame_size=FRAME_SIZE),
    "test": dict(patch=(1, 2, 2), heads=2, head_dim=8, layers=1, ffn=32, freq=16, coord=True, text_width=16,
                 text_layers=1,
                 vae_channels=(8, 16), frames=4, frame_size=16),
}


def _frame_vae(channels, sample_size):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=channels, layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, mid_block_add_attention=False,
                         sample_size=sample_size, scaling_factor=1.0, shift_factor=0.0)


def toy_video_components(size: str = "shapesworld_video", seed: int = 0, from_image_toy: bool | None = None,
                         coord_channels: bool | None = None) -> WanAdapter:
    """A freshly initialised (seeded) toy Wan model built from configs.

    from_image_toy (default: True for the full size): copy the shipped image toy's VAE and text
    encoder weights (samplers/models/weights/shapesworld) instead of random ones.
    coord_channels (default: the size's): t / y / x coordinate input channels (WanAdapter).
    """
    from diffusers import WanTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .clip_tokenizer import build_clip_tokenizer

    s = SIZES[size]
    coord_channels = s["coord"] if coord_channels is None else coord_channels
    from_image_toy = (size == "shapesworld_video") if from_image_toy is None else from_image_toy
    torch.manual_seed(seed)
    width = s["text_width"]
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=s["text_layers"],
        num_attention_heads=4 if width % 4 == 0 else 2, max_position_embeddings=TOKENIZER_MAX_LENGTH,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="gelu"))
    vae = _frame_vae(s["vae_channels"], s["frame_size"])
    transformer = WanTransformer3DModel(
        patch_size=s["patch"], num_attention_heads=s["heads"], attention_head_dim=s["head_dim"], in_channels=4 + 3 * coord_channels,
        out_channels=4, text_dim=width, freq_dim=s["freq"], ffn_dim=s["ffn"], num_layers=s["layers"],
        rope_max_seq_len=64)
    if from_image_toy:
        from .shapesworld import SHAPESWORLD_DIR, load_shapesworld

        image_toy = load_shapesworld(path=SHAPESWORLD_DIR)
        vae = image_toy.vae
        # CLIPTextModelWithProjection's text tower, without the projection (Wan reads hidden states)
        state = {k.removeprefix("text_model."): v for k, v in image_toy.text_encoder.state_dict().items()
                 if not k.startswith("text_projection")}
        text_encoder.load_state_dict(state, strict=True)
    video_size = (s["frames"], s["frame_size"], s["frame_size"])
    return WanAdapter(transformer, vae, text_encoder, build_clip_tokenizer(TOKENIZER_MAX_LENGTH),
                      max_sequence_length=TOKENIZER_MAX_LENGTH, video_size=video_size, defaults=DEFAULTS,
                      tokenizer_spec="clip", coord_channels=coord_channels)


def weights_checksum(root: str | Path = VIDEO_DIR) -> str:
    """SHA-256 over every weight file of a saved model folder (the image toy's `weights_checksum`)."""
    from .shapesworld import weights_checksum as checksum

    return checksum(root)


def load_shapesworld_video(device: str | torch.device = "cpu", path: str | Path | None = None, **kwargs) -> WanAdapter:
    """The shipped, pretrained ShapesWorld-Video model (or one saved by pretrain_video_toy)."""
    root = Path(path) if path else VIDEO_DIR
    if not (root / "transformer").is_dir():
        raise FileNotFoundError(f"ShapesWorld-Video weights not found in {root}; rebuild them with "
                                f"`align pretrain-video-toy --out {root}`")
    return WanAdapter.from_pretrained(root, device=device, **kwargs)
