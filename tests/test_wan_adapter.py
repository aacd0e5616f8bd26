"""The Wan adapter against diffusers' WanPipeline, and the samplers on video through it."""

from __future__ import annotations

import copy

import pytest
import torch

from samplers.generate import generate
from samplers.models.wan import WanAdapter, WanCond
from samplers.rollout import rescore, rollout
from samplers.schedules import flow_sigmas

PROMPTS = ["a red circle moving right", "two blue squares moving up slowly"]


@pytest.fixture(scope="module")
def tiny_wan():
    """A tiny real Wan2.1 stack: AutoencoderKLWan (2x time, 2x space), UMT5 + ByT5 tokenizer."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0],
                           scale_factor_temporal=2, scale_factor_spatial=2)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=384, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, relative_attention_num_buckets=8))
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16,
                                        num_layers=1, rope_max_seq_len=32)
    return WanAdapter(transformer, vae, text_encoder, ByT5Tokenizer(), max_sequence_length=48,
                      video_size=(5, 16, 16), defaults={"num_steps": 3}).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tiny_toy():
    """The toy's layout at test size: per-frame AutoencoderKL, CLIP text encoder, offline CLIP BPE."""
    from samplers.models.shapesworld_video import toy_video_components

    return toy_video_components("test", seed=0).eval().requires_grad_(False)


def _pipeline(model: WanAdapter):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(tokenizer=model.tokenizer, text_encoder=model.text_encoder, vae=model.vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_ode_rollout_reproduces_wan_pipeline(tiny_wan, guidance):
    expected = _pipeline(tiny_wan)(PROMPTS, num_frames=5, height=16, width=16, num_inference_steps=3,
                                   guidance_scale=guidance, max_sequence_length=tiny_wan.max_sequence_length,
                                   generator=torch.Generator().manual_seed(0), output_type="pt").frames
    noise = torch.randn((2, *tiny_wan.latent_shape()), generator=torch.Generator().manual_seed(0))
    cond = tiny_wan.encode_prompt(PROMPTS, negative_prompt="" if guidance > 1 else None)
    traj = rollout(tiny_wan, cond, flow_sigmas(3, shift=3.0), step_types="ode", guidance=guidance,
                   initial_noise=noise)
    ours = tiny_wan.decode(traj.final)
    assert tiny_wan.latent_shape() == (4, 3, 8, 8)
    assert ours.shape == (2, 3, 5, 16, 16)
    torch.testing.assert_close(ours, expected.permute(0, 2, 1, 3, 4), atol=1e-5, rtol=1e-5)


def test_encode_prompt_matches_pipeline(tiny_wan):
    pe, npe = _pipeline(tiny_wan).encode_prompt(PROMPTS, negative_prompt="", device="cpu",
                                                 max_sequence_length=tiny_wan.max_sequence_length)
    cond = tiny_wan.encode_prompt(PROMPTS)
    torch.testing.assert_close(cond.prompt_embeds, pe, atol=0, rtol=0)
    torch.testing.assert_close(cond.negative_prompt_embeds, npe, atol=0, rtol=0)
    assert (cond.prompt_embeds[0, len(PROMPTS[0]) + 1:] == 0).all()  # padding zeroed (bytes + </s>)


def _velocity(model, seed=0, guidance=3.0):
    x = torch.randn((2, *model.latent_shape()), generator=torch.Generator().manual_seed(seed))
    return model.velocity(x, torch.tensor([0.7, 0.3]), model.encode_prompt(PROMPTS), guidance)


def test_from_pretrained_loads_a_diffusers_wan_folder(tiny_wan, tmp_path):
    """A folder written by diffusers' own WanPipeline.save_pretrained (the Wan2.1-Diffusers layout)."""
    from samplers.models import load_model

    _pipeline(tiny_wan).save_pretrained(tmp_path / "wan")
    loaded = load_model(tmp_path / "wan")
    assert isinstance(loaded, WanAdapter) and loaded.defaults["shift"] == 3.0  # from the scheduler config
    loaded.max_sequence_length, loaded.video_size = tiny_wan.max_sequence_length, tiny_wan.video_size
    torch.testing.assert_close(_velocity(loaded), _velocity(tiny_wan), atol=0, rtol=0)


def test_save_and_load_round_trip_of_the_toy_layout(tiny_toy, tmp_path):
    from samplers.models import load_model

    tiny_toy.save_pretrained(tmp_path / "toy")
    assert not (tmp_path / "toy" / "tokenizer").exists()  # the CLIP BPE is rebuilt offline
    loaded = load_model(tmp_path / "toy")
    assert isinstance(loaded, WanAdapter)
    assert type(loaded.vae).__name__ == "AutoencoderKL" and type(loaded.text_encoder).__name__ == "CLIPTextModel"
    assert (loaded.video_size, loaded.defaults, loaded.max_sequence_length, loaded.coord_channels) == (
        tiny_toy.video_size, tiny_toy.defaults, tiny_toy.max_sequence_length, True)
    torch.testing.assert_close(_velocity(loaded), _velocity(tiny_toy), atol=0, rtol=0)
    a = generate(tiny_toy, PROMPTS, seeds=[3, 4], num_steps=3)
    b = generate(loaded, PROMPTS, seeds=[3, 4], num_steps=3)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("which", ["tiny_wan", "tiny_toy"])
def test_generate_returns_videos_in_unit_range(which, request):
    model = request.getfixturevalue(which)
    videos = generate(model, PROMPTS * 2, seeds=[0, 1, 2, 3], num_steps=3, batch_size=3)
    t, h, w = model.video_size
    assert videos.shape == (4, 3, t, h, w)
    assert videos.min() >= 0 and videos.max() <= 1 and videos.std() > 0
    apart = generate(model, PROMPTS * 2, seeds=[0, 1, 2, 3], num_steps=3, batch_size=1)
    torch.testing.assert_close(videos, apart, atol=1e-5, rtol=1e-5)


def test_sde_rollout_log_probs_rescore_exactly_on_video(tiny_toy):
    cond = tiny_toy.encode_prompt(PROMPTS * 2)
    traj = rollout(tiny_toy, cond, flow_sigmas(4), step_types="flow_grpo_sde", step_params={"noise_level": 0.7},
                   guidance=4.5, batch_size=4, generator=torch.Generator().manual_seed(0), group_size=2,
                   share_initial_noise=True, antithetic=True)
    assert traj.latents.shape == (4, 5, *tiny_toy.latent_shape())
    assert torch.equal(traj.latents[0, 0], traj.latents[1, 0])  # shared initial noise within a group
    log_prob, mean, _ = rescore(tiny_toy, cond, traj, [0, 1, 2])
    torch.testing.assert_close(log_prob, traj.log_probs[:, :3], atol=0, rtol=0)
    assert mean.shape == (4, 3, *tiny_toy.latent_shape())


def test_cond_batching_ops(tiny_toy):
    cond = tiny_toy.encode_prompt(PROMPTS)
    grouped = cond.repeat_interleave(3)
    assert len(grouped) == 6 and torch.equal(grouped.prompt_embeds[2], cond.prompt_embeds[0])
    both = WanCond.cat([cond, grouped.index(torch.tensor([5]))])
    assert len(both) == 3 and torch.equal(both.negative_prompt_embeds[2], cond.negative_prompt_embeds[1])
    assert WanCond(cond.prompt_embeds).negative_prompt_embeds is None


def test_lora_changes_outputs_disabling_restores_and_files_round_trip(tiny_toy, tmp_path):
    model = copy.deepcopy(tiny_toy)
    base = _velocity(model)
    model.add_lora(rank=4)
    torch.testing.assert_close(_velocity(model), base, atol=0, rtol=0)  # lora_B starts at zero
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    tuned = _velocity(model)
    assert (tuned - base).abs().max() > 1e-3
    with model.lora_disabled():
        torch.testing.assert_close(_velocity(model), base, atol=0, rtol=0)
    file = model.save_lora(tmp_path / "lora")
    fresh = copy.deepcopy(tiny_toy)
    fresh.load_lora(file)
    torch.testing.assert_close(_velocity(fresh), tuned, atol=1e-6, rtol=1e-6)


def test_lora_gradients_flow_through_a_video_rescore(tiny_toy):
    model = copy.deepcopy(tiny_toy)
    model.add_lora(rank=4)
    cond = model.encode_prompt(PROMPTS)
    traj = rollout(model, cond, flow_sigmas(3), step_params={"noise_level": 0.7}, guidance=1.0, batch_size=2,
                   generator=torch.Generator().manual_seed(1))
    log_prob, _, _ = rescore(model, cond, traj, 1, guidance=1.0)
    log_prob.sum().backward()
    # lora_B starts at zero, so only it gets a gradient on the first step (as in any LoRA run)
    grads = [p.grad for n, p in model.transformer.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_encode_decode_shapes_and_frame_vae_is_per_frame(tiny_wan, tiny_toy):
    video = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0))
    z = tiny_wan.encode(video)
    assert z.shape == (2, *tiny_wan.latent_shape()) and tiny_wan.decode(z).shape == video.shape
    clip = torch.rand(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    z = tiny_toy.encode(clip)
    assert z.shape == (2, *tiny_toy.latent_shape())
    cfg = tiny_toy.vae.config
    frame = (tiny_toy.vae.encode(clip[:, :, 2] * 2 - 1).latent_dist.mode() - cfg.shift_factor) * cfg.scaling_factor
    torch.testing.assert_close(z[:, :, 2], frame)


def test_latent_shape_checks(tiny_wan, tiny_toy):
    assert tiny_wan.latent_shape(num_frames=9) == (4, 5, 8, 8)
    with pytest.raises(ValueError, match="num_frames - 1"):
        tiny_wan.latent_shape(num_frames=4)
    with pytest.raises(ValueError, match="divisible"):
        tiny_toy.latent_shape(18, 18)
    assert tiny_toy.latent_shape(32, 16, num_frames=6) == (4, 6, 16, 8)


def test_coordinate_channels_give_the_transformer_absolute_positions(tiny_toy):
    """Relative RoPE alone is translation-equivariant: on a constant latent every token sees the same
    input, so the velocity repeats from patch to patch. The t / y / x ramps break that."""
    from samplers.models.shapesworld_video import toy_video_components
    from samplers.models.wan import coordinate_channels

    ramps = coordinate_channels(torch.zeros(2, 4, 3, 2, 5))
    assert ramps.shape == (2, 3, 3, 2, 5)
    torch.testing.assert_close(ramps[1, :, 2, 1, 4], torch.ones(3))
    torch.testing.assert_close(ramps[0, 2, 0, 0], torch.linspace(-1, 1, 5))
    cond = tiny_toy.encode_prompt(PROMPTS[:1], negative_prompt=None)
    latents = torch.full((1, *tiny_toy.latent_shape()), 0.3)  # patch (1, 2, 2): tokens of one frame x 2x2
    blind = toy_video_components("test", seed=0, coord_channels=False).eval()
    with torch.no_grad():
        outputs = [model.velocity(latents, 0.9, cond) for model in (blind, tiny_toy)]
    tokens = [v.unfold(3, 2, 2).unfold(4, 2, 2) for v in outputs]  # [1, C, T, H/2, W/2, 2, 2]
    spread = [(t - t[:, :, :1, :1, :1]).abs().max().item() for t in tokens]
    assert spread[0] < 1e-5 < 1e-2 < spread[1], spread
    with pytest.raises(ValueError, match="coord_channels"):
        WanAdapter(blind.transformer, blind.vae, blind.text_encoder, blind.tokenizer, coord_channels=True)
