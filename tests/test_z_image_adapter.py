"""Z-Image (base and Turbo) adapter against diffusers' ZImagePipeline: CFG when the scale is > 0,
the transformer's reversed time and sign, fixed shift for Turbo."""

from __future__ import annotations

import pytest
import torch
from adapter_checks import (assert_load_model_recognises, assert_one_epoch_trains_every_lora_weight,
                            assert_sde_rescore_is_exact, lora_model)

from samplers.models.tiny import tiny_z_image
from samplers.models.z_image import ZImageAdapter
from samplers.rollout import rollout

PROMPTS = ["a red circle above a blue square", "two green triangles"]


@pytest.fixture(scope="module")
def zimage():
    return tiny_z_image(seed=0)


def _compare(model, pipe, height, width, guidance, steps=3, **pipe_kwargs):
    noise = torch.randn((2, *model.latent_shape(height, width)), generator=torch.Generator().manual_seed(0))
    # (ZImagePipeline rewrites the prompt list it is given in place: pass a copy)
    expected = pipe(prompt=list(PROMPTS), height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                    latents=noise, max_sequence_length=model.max_sequence_length, output_type="pt",
                    **pipe_kwargs).images
    cond = model.encode_prompt(PROMPTS, negative_prompt="" if guidance > 0 else None)
    sigmas = model.sigmas(steps, height, width)
    assert torch.equal(sigmas, pipe.scheduler.sigmas)  # bit for bit
    traj = rollout(model, cond, sigmas, step_types="ode", guidance=guidance, initial_noise=noise)
    return model.decode(traj.final), expected


def test_encode_prompt_matches_pipeline(zimage):
    pe, npe = zimage.pipeline().encode_prompt(list(PROMPTS), negative_prompt=None, do_classifier_free_guidance=True,
                                              device="cpu", max_sequence_length=zimage.max_sequence_length)
    cond = zimage.encode_prompt(PROMPTS, negative_prompt="")
    assert cond.lengths.tolist() == [p.shape[0] for p in pe] and pe[0].shape[0] != pe[1].shape[0]
    for ours, theirs in [(cond.prompt_embeds, pe), (cond.negative_prompt_embeds, npe)]:
        for row, ref in zip(ours, theirs):
            torch.testing.assert_close(row[: ref.shape[0]], ref, atol=1e-6, rtol=0)
            assert not row[ref.shape[0]:].any()


@pytest.mark.parametrize("guidance", [0.0, 5.0])
@pytest.mark.parametrize("size", [(16, 16), (24, 32)])
def test_ode_rollout_reproduces_z_image_pipeline(zimage, guidance, size):
    ours, expected = _compare(zimage, zimage.pipeline(), *size, guidance)
    assert ours.shape == expected.shape == (2, 3, *size)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_cfg_truncation_and_normalization_follow_the_pipeline(zimage):
    zimage.defaults.update(cfg_truncation=0.5, cfg_normalization=1.0)
    try:
        ours, expected = _compare(zimage, zimage.pipeline(), 16, 16, 5.0, steps=4, cfg_truncation=0.5,
                                  cfg_normalization=1.0)
    finally:
        zimage.defaults.update(cfg_truncation=1.0, cfg_normalization=0.0)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_turbo_fixed_shift_and_no_guidance():
    turbo = tiny_z_image(seed=0, turbo=True)
    assert torch.equal(turbo.sigmas(4, 16, 16), turbo.sigmas(4, 64, 64))  # no resolution dependence
    ours, expected = _compare(turbo, turbo.pipeline(), 16, 16, 0.0, steps=4)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_sde_rescore_is_exact(zimage):
    assert_sde_rescore_is_exact(zimage, zimage.encode_prompt(PROMPTS, negative_prompt=""), zimage.sigmas(4),
                                guidance=5.0)


def test_lora_file_loads_into_the_pipeline(zimage, tmp_path):
    tuned = lora_model(zimage)
    tuned.save_lora(tmp_path / "lora")
    pipe = tiny_z_image(seed=0).pipeline()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    ours, expected = _compare(tuned, pipe, 16, 16, 5.0, steps=2)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    base, _ = _compare(zimage, zimage.pipeline(), 16, 16, 5.0, steps=2)
    assert (ours - base).abs().max() > 1e-4


@pytest.mark.parametrize("trainer", ["flow_grpo", "crd", "nft"])
def test_one_epoch_trains_every_lora_weight(trainer, tmp_path):
    assert_one_epoch_trains_every_lora_weight(trainer, lambda: tiny_z_image(seed=0), tmp_path,
                                              sampler=dict(guidance=5.0))


def test_load_model_recognises_z_image(zimage, tmp_path):
    loaded = assert_load_model_recognises(zimage.pipeline(), tmp_path, ZImageAdapter)
    loaded.max_sequence_length = zimage.max_sequence_length
    x = torch.randn((1, *zimage.latent_shape()), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, 0.5, loaded.encode_prompt(PROMPTS[:1]), 0.0),
                                   zimage.velocity(x, 0.5, zimage.encode_prompt(PROMPTS[:1]), 0.0), atol=1e-6, rtol=0)
