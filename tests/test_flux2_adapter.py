"""FLUX.2 [klein] adapter against diffusers' Flux2KleinPipeline (patchified, batch-normalised
latents, empirical-mu schedule, CFG against the empty prompt unless distilled)."""

from __future__ import annotations

import pytest
import torch
from adapter_checks import (assert_load_model_recognises, assert_one_epoch_trains_every_lora_weight,
                            assert_sde_rescore_is_exact, lora_model)

from samplers.models.flux2 import Flux2KleinAdapter
from samplers.models.tiny import tiny_flux2_klein
from samplers.rollout import rollout

PROMPTS = ["a red circle above a blue square", "two green triangles"]


@pytest.fixture(scope="module")
def klein():
    return tiny_flux2_klein(seed=0)


def _compare(model, pipe, height, width, guidance, steps=3):
    noise = torch.randn((2, *model.latent_shape(height, width)), generator=torch.Generator().manual_seed(0))
    expected = pipe(prompt=list(PROMPTS), height=height, width=width, num_inference_steps=steps,
                    guidance_scale=guidance, latents=noise, max_sequence_length=model.max_sequence_length,
                    text_encoder_out_layers=tuple(model.text_encoder_out_layers), output_type="pt").images
    cond = model.encode_prompt(PROMPTS, negative_prompt="" if guidance > 1 else None)
    sigmas = model.sigmas(steps, height, width)
    assert torch.equal(sigmas, pipe.scheduler.sigmas)  # bit for bit
    traj = rollout(model, cond, sigmas, step_types="ode", guidance=guidance, initial_noise=noise)
    return model.decode(traj.final), expected


def test_encode_prompt_matches_pipeline(klein):
    pe, text_ids = klein.pipeline().encode_prompt(list(PROMPTS), device="cpu", max_sequence_length=64,
                                                  text_encoder_out_layers=(1, 2, 3))
    cond = klein.encode_prompt(PROMPTS, negative_prompt="")
    torch.testing.assert_close(cond.prompt_embeds, pe, atol=1e-6, rtol=0)
    assert text_ids[0, 5].tolist() == [0, 0, 0, 5] and cond.negative_prompt_embeds.shape == pe.shape


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_ode_rollout_reproduces_flux2_klein_pipeline(klein, guidance, size):
    ours, expected = _compare(klein, klein.pipeline(), *size, guidance)
    assert ours.shape == expected.shape == (2, 3, *size)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_distilled_klein_runs_one_branch():
    distilled = tiny_flux2_klein(seed=0, is_distilled=True)
    assert distilled.encode_prompt(PROMPTS, negative_prompt="").negative_prompt_embeds is None
    ours, expected = _compare(distilled, distilled.pipeline(), 32, 32, 4.0)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_encode_decode_round_trip_the_vae_normalisation(klein):
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    z = klein.encode(images)
    assert z.shape == (1, *klein.latent_shape())
    with torch.no_grad():
        expected = klein.pipeline()._encode_vae_image(images * 2 - 1, None)
    torch.testing.assert_close(z, expected, atol=1e-6, rtol=0)


def test_sde_rescore_is_exact(klein):
    assert_sde_rescore_is_exact(klein, klein.encode_prompt(PROMPTS, negative_prompt=""), klein.sigmas(4), 4.0)


def test_lora_file_loads_into_the_pipeline(klein, tmp_path):
    tuned = lora_model(klein)
    tuned.save_lora(tmp_path / "lora")
    pipe = tiny_flux2_klein(seed=0).pipeline()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    ours, expected = _compare(tuned, pipe, 32, 32, 4.0, steps=2)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    base, _ = _compare(klein, klein.pipeline(), 32, 32, 4.0, steps=2)
    assert (ours - base).abs().max() > 1e-4


@pytest.mark.parametrize("trainer", ["flow_grpo", "crd", "nft"])
def test_one_epoch_trains_every_lora_weight(trainer, tmp_path):
    assert_one_epoch_trains_every_lora_weight(trainer, lambda: tiny_flux2_klein(seed=0), tmp_path,
                                              sampler=dict(guidance=4.0))


def test_load_model_recognises_flux2_klein(tmp_path):
    distilled = tiny_flux2_klein(seed=0, is_distilled=True)
    loaded = assert_load_model_recognises(distilled.pipeline(), tmp_path, Flux2KleinAdapter)
    assert loaded.is_distilled  # read from the pipeline's config


# ----------------------------------------------------------------------------- FLUX.2 [dev]


@pytest.fixture(scope="module")
def dev():
    from samplers.models.tiny import tiny_flux2

    return tiny_flux2(seed=0)


def test_dev_encode_prompt_matches_pipeline(dev):
    pe, _ = dev.pipeline().encode_prompt(list(PROMPTS), device="cpu", max_sequence_length=dev.max_sequence_length,
                                         text_encoder_out_layers=(1, 2, 3))
    cond = dev.encode_prompt(PROMPTS, negative_prompt="")
    torch.testing.assert_close(cond.prompt_embeds, pe, atol=1e-6, rtol=0)
    assert cond.negative_prompt_embeds is None  # guidance-distilled: no CFG branch
    assert not torch.equal(pe[0], pe[1])  # the prompt survives the system message


@pytest.mark.parametrize("guidance", [1.0, 4.0])  # the embedded scale, one branch either way
@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_dev_ode_rollout_reproduces_flux2_pipeline(dev, guidance, size):
    ours, expected = _compare(dev, dev.pipeline(), *size, guidance)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_dev_lora_rescore_training_and_loading(dev, tmp_path):
    from samplers.models.flux2 import Flux2Adapter
    from samplers.models.tiny import tiny_flux2

    assert_sde_rescore_is_exact(dev, dev.encode_prompt(PROMPTS), dev.sigmas(4), 4.0)
    tuned = lora_model(dev)
    tuned.save_lora(tmp_path / "lora")
    pipe = tiny_flux2(seed=0).pipeline()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    ours, expected = _compare(tuned, pipe, 32, 32, 4.0, steps=2)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert_one_epoch_trains_every_lora_weight("flow_grpo", lambda: tiny_flux2(seed=0), tmp_path,
                                              sampler=dict(guidance=4.0))
    assert_load_model_recognises(dev.pipeline(), tmp_path / "saved", Flux2Adapter)
