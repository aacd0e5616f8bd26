"""HunyuanVideo adapter against diffusers' HunyuanVideoPipeline (embedded guidance, true CFG)."""

from __future__ import annotations

import pytest
import torch
from adapter_checks import (assert_load_model_recognises, assert_one_epoch_trains_every_lora_weight,
                            assert_sde_rescore_is_exact, lora_model)

from samplers.models.hunyuan_video import HunyuanVideoAdapter
from samplers.models.tiny import tiny_hunyuan_video
from samplers.rollout import rollout

PROMPTS = ["a red circle moving right", "two blue squares"]


@pytest.fixture(scope="module")
def hunyuan():
    return tiny_hunyuan_video(seed=0)


def _compare(model, pipe, height, width, guidance, negative=None, true_cfg=1.0, steps=3):
    noise = torch.randn((2, *model.latent_shape(height, width)), generator=torch.Generator().manual_seed(0))
    expected = pipe(prompt=PROMPTS, negative_prompt=negative, true_cfg_scale=true_cfg, height=height, width=width,
                    num_frames=5, num_inference_steps=steps, guidance_scale=guidance, latents=noise,
                    max_sequence_length=model.max_sequence_length, output_type="pt").frames
    model.defaults["true_cfg_scale"] = true_cfg
    try:
        cond = model.encode_prompt(PROMPTS, negative_prompt=negative)
        sigmas = model.sigmas(steps)
        assert torch.equal(sigmas, pipe.scheduler.sigmas)  # bit for bit
        traj = rollout(model, cond, sigmas, step_types="ode", guidance=guidance, initial_noise=noise)
    finally:
        model.defaults["true_cfg_scale"] = 1.0
    return model.decode(traj.final), expected.permute(0, 2, 1, 3, 4)


def test_encode_prompt_matches_pipeline(hunyuan):
    pe, pooled, mask = hunyuan.pipeline().encode_prompt(PROMPTS, device="cpu",
                                                        max_sequence_length=hunyuan.max_sequence_length)
    cond = hunyuan.encode_prompt(PROMPTS)
    torch.testing.assert_close(cond.prompt_embeds, pe, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond.pooled, pooled, atol=1e-6, rtol=0)
    assert torch.equal(cond.prompt_mask, mask) and not mask.all()  # padded prompts are masked


# embedded guidance only (the default), and with true CFG on a negative prompt
@pytest.mark.parametrize("case", ["embedded", "true_cfg"])
@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_ode_rollout_reproduces_hunyuan_video_pipeline(hunyuan, case, size):
    negative, true_cfg = ("static", 3.0) if case == "true_cfg" else (None, 1.0)
    ours, expected = _compare(hunyuan, hunyuan.pipeline(), *size, guidance=6.0, negative=negative, true_cfg=true_cfg)
    assert ours.shape == (2, 3, 5, *size)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_embedded_guidance_changes_the_velocity(hunyuan):
    cond = hunyuan.encode_prompt(PROMPTS)
    x = torch.randn((2, *hunyuan.latent_shape()), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hunyuan.velocity(x, 0.5, cond, 1.0) - hunyuan.velocity(x, 0.5, cond, 6.0)).abs().max() > 1e-4


def test_sde_rescore_is_exact(hunyuan):
    assert_sde_rescore_is_exact(hunyuan, hunyuan.encode_prompt(PROMPTS), hunyuan.sigmas(4), guidance=6.0)


def test_lora_file_loads_into_the_pipeline(hunyuan, tmp_path):
    tuned = lora_model(hunyuan)
    tuned.save_lora(tmp_path / "lora")
    pipe = tiny_hunyuan_video(seed=0).pipeline()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    ours, expected = _compare(tuned, pipe, 32, 32, 6.0, steps=2)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    base, _ = _compare(hunyuan, hunyuan.pipeline(), 32, 32, 6.0, steps=2)
    assert (ours - base).abs().max() > 1e-4


@pytest.mark.parametrize("trainer", ["flow_grpo", "crd", "nft"])
def test_one_epoch_trains_every_lora_weight(trainer, tmp_path):
    assert_one_epoch_trains_every_lora_weight(trainer, lambda: tiny_hunyuan_video(seed=0), tmp_path,
                                              sampler=dict(guidance=6.0))


def test_load_model_recognises_hunyuan_video(hunyuan, tmp_path):
    loaded = assert_load_model_recognises(hunyuan.pipeline(), tmp_path, HunyuanVideoAdapter)
    loaded.max_sequence_length, loaded.video_size = hunyuan.max_sequence_length, hunyuan.video_size
    x = torch.randn((1, *hunyuan.latent_shape()), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, 0.5, loaded.encode_prompt(PROMPTS[:1])),
                                   hunyuan.velocity(x, 0.5, hunyuan.encode_prompt(PROMPTS[:1])), atol=1e-6, rtol=0)
