"""Wan2.2 (two experts switched at boundary_ratio) against diffusers' WanPipeline with transformer_2."""

from __future__ import annotations

import copy

import pytest
import torch
from adapter_checks import (assert_load_model_recognises, assert_one_epoch_trains_every_lora_weight,
                            assert_sde_rescore_is_exact, lora_model)

from samplers.models.tiny import tiny_wan22
from samplers.models.wan import WanAdapter
from samplers.rollout import rollout
from samplers.schedules import flow_sigmas

PROMPTS = ["a red circle moving right", "two blue squares moving up"]


@pytest.fixture(scope="module")
def wan22():
    return tiny_wan22(seed=0)


def _pipeline(model: WanAdapter):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(tokenizer=model.tokenizer, text_encoder=model.text_encoder, vae=model.vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=model.transformer,
                       transformer_2=model.transformer_2, boundary_ratio=model.boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _compare(model, pipe, guidance, size=(16, 16), steps=4):
    h, w = size
    noise = torch.randn((2, *model.latent_shape(h, w)), generator=torch.Generator().manual_seed(0))
    expected = pipe(PROMPTS, num_frames=5, height=h, width=w, num_inference_steps=steps, guidance_scale=guidance,
                    guidance_scale_2=model.defaults["guidance_2"], latents=noise,
                    max_sequence_length=model.max_sequence_length, output_type="pt").frames
    cond = model.encode_prompt(PROMPTS, negative_prompt="" if guidance > 1 else None)
    sigmas = flow_sigmas(steps, shift=3.0)
    assert torch.equal(sigmas, pipe.scheduler.sigmas)  # the schedule, bit for bit
    traj = rollout(model, cond, sigmas, step_types="ode", guidance=guidance, initial_noise=noise)
    return model.decode(traj.final), expected.permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("size", [(16, 16), (16, 32)])
def test_ode_rollout_reproduces_the_two_expert_pipeline(wan22, guidance, size):
    ours, expected = _compare(wan22, _pipeline(wan22), guidance, size)
    assert ours.shape == (2, 3, 5, *size)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_both_experts_are_used_and_chosen_per_sample(wan22):
    sigmas = flow_sigmas(4, shift=3.0)
    high = (sigmas[:-1] * 1000 >= 875).tolist()
    assert True in high and False in high  # the 4-step schedule crosses the boundary
    cond = wan22.encode_prompt(PROMPTS)
    x = torch.randn((2, *wan22.latent_shape()), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = wan22.velocity(x, torch.tensor([0.95, 0.5]), cond, 4.0)  # one sample per expert
        alone = [wan22.velocity(x[i:i + 1], s, cond.index([i]), 4.0) for i, s in enumerate([0.95, 0.5])]
        v_high = wan22._guided(x[:1], torch.tensor([0.95]), cond.index([0]), 4.0, wan22.transformer)
        v_low_other = wan22._guided(x[1:], torch.tensor([0.5]), cond.index([1]), 3.0, wan22.transformer)
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(alone[0], v_high)
    assert (alone[1] - v_low_other).abs().max() > 1e-4  # the low-noise step is not the high expert's


def test_encode_prompt_matches_pipeline(wan22):
    pe, npe = _pipeline(wan22).encode_prompt(PROMPTS, negative_prompt="", device="cpu",
                                              max_sequence_length=wan22.max_sequence_length)
    cond = wan22.encode_prompt(PROMPTS)
    torch.testing.assert_close(cond.prompt_embeds, pe, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond.negative_prompt_embeds, npe, atol=1e-6, rtol=0)


def test_sde_rescore_is_exact_across_the_boundary(wan22):
    assert_sde_rescore_is_exact(wan22, wan22.encode_prompt(PROMPTS), flow_sigmas(4, shift=3.0), guidance=4.0)


def test_lora_on_both_experts_loads_into_the_pipeline(wan22, tmp_path):
    tuned = lora_model(wan22)
    assert any("lora_" in n for n, _ in tuned.transformer_2.named_parameters())
    tuned.save_lora(tmp_path / "lora")
    assert (tmp_path / "lora" / "transformer_2" / "pytorch_lora_weights.safetensors").is_file()
    pipe = _pipeline(copy.deepcopy(wan22))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    pipe.load_lora_weights(str(tmp_path / "lora" / "transformer_2"), load_into_transformer_2=True)
    ours, expected = _compare(tuned, pipe, 4.0)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    base, _ = _compare(wan22, _pipeline(wan22), 4.0)
    assert (ours - base).abs().max() > 1e-4
    fresh = copy.deepcopy(wan22)
    fresh.load_lora(tmp_path / "lora")
    x = torch.randn((2, *wan22.latent_shape()), generator=torch.Generator().manual_seed(2))
    cond = wan22.encode_prompt(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(x, torch.tensor([0.95, 0.3]), cond, 4.0),
                                   tuned.velocity(x, torch.tensor([0.95, 0.3]), cond, 4.0), atol=1e-5, rtol=1e-5)
        with tuned.lora_disabled():
            torch.testing.assert_close(tuned.velocity(x, 0.3, cond, 4.0), wan22.velocity(x, 0.3, cond, 4.0))


@pytest.mark.parametrize("trainer", ["flow_grpo", "crd", "nft"])
def test_one_epoch_trains_every_lora_weight_of_the_trained_expert(trainer, tmp_path):
    assert_one_epoch_trains_every_lora_weight(trainer, lambda: tiny_wan22(seed=0), tmp_path,
                                              sampler=dict(guidance=4.0, shift=3.0))


def test_load_model_recognises_wan22(wan22, tmp_path):
    loaded = assert_load_model_recognises(_pipeline(wan22), tmp_path, WanAdapter)
    assert loaded.boundary_ratio == 0.875 and loaded.transformer_2 is not None
    loaded.max_sequence_length, loaded.video_size, loaded.defaults = (wan22.max_sequence_length, wan22.video_size,
                                                                      wan22.defaults)
    x = torch.randn((2, *wan22.latent_shape()), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.95, 0.3])
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, sigma, loaded.encode_prompt(PROMPTS), 4.0),
                                   wan22.velocity(x, sigma, wan22.encode_prompt(PROMPTS), 4.0), atol=0, rtol=0)


# ----------------------------------------------------------------------------- image-to-video


@pytest.fixture(scope="module")
def i2v():
    return tiny_wan22(seed=3, i2v=True)


def _first_frame(seed=5):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(16, 16, 3) * 255).astype(np.uint8))


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_image_to_video_rollout_reproduces_the_i2v_pipeline(i2v, guidance):
    """The first frame through the shared image path == WanImageToVideoPipeline (Wan2.2-I2V layout:
    two experts, no CLIP image encoder)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline(tokenizer=i2v.tokenizer, text_encoder=i2v.text_encoder, vae=i2v.vae,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=i2v.transformer,
                                   transformer_2=i2v.transformer_2, boundary_ratio=i2v.boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    image = _first_frame()
    noise = torch.randn((1, *i2v.latent_shape()), generator=torch.Generator().manual_seed(0))
    expected = pipe(image=image, prompt=PROMPTS[:1], num_frames=5, height=16, width=16, num_inference_steps=4,
                    guidance_scale=guidance, guidance_scale_2=3.0, latents=noise,
                    max_sequence_length=i2v.max_sequence_length, output_type="pt").frames
    cond = i2v.encode_prompt(PROMPTS[:1], negative_prompt="" if guidance > 1 else None, images=image)
    traj = rollout(i2v, cond, flow_sigmas(4, shift=3.0), step_types="ode", guidance=guidance, initial_noise=noise)
    torch.testing.assert_close(i2v.decode(traj.final), expected.permute(0, 2, 1, 3, 4), atol=1e-5, rtol=1e-5)


def test_image_to_video_needs_a_frame_and_text_to_video_refuses_one(i2v, wan22):
    with pytest.raises(ValueError, match="pass images="):
        i2v.encode_prompt(PROMPTS)
    with pytest.raises(ValueError, match="text-to-video"):
        wan22.encode_prompt(PROMPTS, images=torch.rand(3, 16, 16))


def test_one_epoch_of_image_to_video_with_a_first_frame(tmp_path):
    def make():
        model = tiny_wan22(seed=3, i2v=True)
        model.reference_images = {"*": _first_frame()}
        return model

    assert_one_epoch_trains_every_lora_weight("flow_grpo", make, tmp_path, sampler=dict(guidance=4.0, shift=3.0))


def test_load_model_recognises_an_i2v_folder(i2v, tmp_path):
    from samplers.models import load_model

    i2v.save_pretrained(tmp_path / "i2v")
    loaded = load_model(tmp_path / "i2v")
    assert loaded.image_channels == 6 and loaded.transformer_2 is not None


def test_experts_may_run_in_different_dtypes(wan22):
    """Trainers cast `model.transformer` to the mixed-precision dtype; the low-noise expert keeps its
    own, and each gets its inputs in its dtype."""
    model = copy.deepcopy(wan22)
    model.transformer.to(torch.bfloat16)
    cond = model.encode_prompt(PROMPTS)
    x = torch.randn((2, *model.latent_shape()), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        v = model.velocity(x, torch.tensor([0.95, 0.3]), cond, 4.0)
        ref = wan22.velocity(x, torch.tensor([0.95, 0.3]), cond, 4.0)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v[1], ref[1], atol=1e-5, rtol=1e-5)  # the fp32 low-noise expert: unchanged
    torch.testing.assert_close(v[0], ref[0], atol=0.1, rtol=0.1)  # the bf16 high-noise one: close


def test_ti2v_5b_folders_are_refused_clearly(wan22, tmp_path):
    import json

    from samplers.models import load_model

    wan22.save_pretrained(tmp_path / "ti2v")
    index = json.loads((tmp_path / "ti2v" / "model_index.json").read_text())
    (tmp_path / "ti2v" / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))
    with pytest.raises(ValueError, match="expand_timesteps"):
        load_model(tmp_path / "ti2v")
