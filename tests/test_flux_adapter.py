"""FLUX.1 and FLUX.1 Kontext adapters against diffusers' FluxPipeline / FluxKontextPipeline."""

from __future__ import annotations

import pytest
import torch
from adapter_checks import (assert_load_model_recognises, assert_one_epoch_trains_every_lora_weight,
                            assert_sde_rescore_is_exact, lora_model)

from samplers.models.flux import FluxAdapter, FluxKontextAdapter, pack_latents, unpack_latents
from samplers.models.tiny import tiny_flux
from samplers.rollout import rollout
from samplers.schedules import flux_sigmas

PROMPTS = ["a red circle above a blue square", "two green triangles"]


@pytest.fixture(scope="module")
def dev():
    return tiny_flux(seed=0)


@pytest.fixture(scope="module")
def kontext():
    return tiny_flux(seed=1, kontext=True)


def _image(height=16, width=24, seed=3):
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))


def _run_both(model, pipe, height, width, guidance, negative=None, true_cfg=1.0, steps=3, image=None):
    """(ours decoded, pipeline images, our sigmas, the pipeline scheduler's sigmas) from the same noise."""
    b = len(PROMPTS)
    noise = torch.randn((b, *model.latent_shape(height, width)), generator=torch.Generator().manual_seed(0))
    extra = {} if image is None else dict(image=image[None], _auto_resize=False, max_area=height * width)
    expected = pipe(prompt=PROMPTS, negative_prompt=negative, true_cfg_scale=true_cfg, height=height, width=width,
                    num_inference_steps=steps, guidance_scale=guidance, latents=pack_latents(noise),
                    max_sequence_length=model.max_sequence_length, output_type="pt", **extra).images
    model.defaults["true_cfg_scale"] = true_cfg
    try:
        cond = model.encode_prompt(PROMPTS, negative_prompt=negative,
                                   **({} if image is None else {"images": image}))
        sigmas = model.sigmas(steps, height, width)
        traj = rollout(model, cond, sigmas, step_types="ode", guidance=guidance, initial_noise=noise)
    finally:
        model.defaults["true_cfg_scale"] = 1.0
    return model.decode(traj.final), expected, sigmas, pipe.scheduler.sigmas


def test_packing_round_trips():
    x = torch.randn(2, 4, 6, 8)
    tokens = pack_latents(x)
    assert tokens.shape == (2, 12, 16)
    assert torch.equal(unpack_latents(tokens, 6, 8), x)


def test_encode_prompt_matches_pipeline(dev):
    pe, pooled, text_ids = dev.pipeline().encode_prompt(PROMPTS, device="cpu", max_sequence_length=16)
    cond = dev.encode_prompt(PROMPTS, negative_prompt="")
    torch.testing.assert_close(cond.prompt_embeds, pe, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond.pooled, pooled, atol=1e-6, rtol=0)
    assert not text_ids.any() and cond.negative_prompt_embeds.shape == pe.shape


# embedded guidance (dev), embedded + true CFG with a negative prompt, no guidance (schnell-style)
@pytest.mark.parametrize("case", ["embedded", "true_cfg", "no_guidance"])
@pytest.mark.parametrize("size", [(16, 16), (24, 32)])
def test_ode_rollout_reproduces_flux_pipeline(dev, case, size):
    model = tiny_flux(seed=2, guidance_embeds=False) if case == "no_guidance" else dev
    negative, true_cfg = ("blurry", 2.0) if case == "true_cfg" else (None, 1.0)
    ours, expected, sigmas, pipe_sigmas = _run_both(model, model.pipeline(), *size, guidance=3.5,
                                                    negative=negative, true_cfg=true_cfg)
    assert ours.shape == expected.shape == (2, 3, *size)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(sigmas, pipe_sigmas)  # dynamic shift: bit for bit
    seq_len = (size[0] // 4) * (size[1] // 4)
    assert torch.equal(sigmas, flux_sigmas(3, seq_len))  # the closed-form helper agrees


def test_dynamic_shift_depends_on_resolution(dev):
    assert not torch.equal(dev.sigmas(4, 16, 16), dev.sigmas(4, 64, 64))
    assert dev.sigmas(4, 64, 64)[1] > dev.sigmas(4, 16, 16)[1]  # more tokens, more shift


def test_sde_rescore_is_exact(dev, kontext):
    assert_sde_rescore_is_exact(dev, dev.encode_prompt(PROMPTS), dev.sigmas(4), guidance=3.5)
    cond = kontext.encode_prompt(PROMPTS, images=_image())
    assert_sde_rescore_is_exact(kontext, cond, kontext.sigmas(4), guidance=2.5)


def test_lora_file_loads_into_the_pipeline_with_the_same_velocity(dev, tmp_path):
    tuned = lora_model(dev)
    cond = dev.encode_prompt(PROMPTS[:1])
    x = torch.randn((1, *dev.latent_shape()), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v_tuned = tuned.velocity(x, 0.6, cond, 3.5)
        assert (v_tuned - dev.velocity(x, 0.6, cond, 3.5)).abs().max() > 1e-3
    tuned.save_lora(tmp_path / "lora")
    fresh = tiny_flux(seed=0)
    pipe = fresh.pipeline()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():  # the pipeline's transformer, called as FluxPipeline calls it
        from samplers.models.flux import latent_position_ids

        v_pipe = pipe.transformer(hidden_states=pack_latents(x), timestep=torch.tensor([0.6]),
                                  guidance=torch.tensor([3.5]), pooled_projections=cond.pooled,
                                  encoder_hidden_states=cond.prompt_embeds, txt_ids=torch.zeros(16, 3),
                                  img_ids=latent_position_ids(4, 4), return_dict=False)[0]
    torch.testing.assert_close(unpack_latents(v_pipe, 8, 8), v_tuned, atol=1e-5, rtol=1e-5)


def test_kontext_rollout_reproduces_kontext_pipeline(kontext):
    image = _image(16, 24)
    ours, expected, sigmas, pipe_sigmas = _run_both(kontext, kontext.pipeline(), 16, 16, guidance=2.5, image=image)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(sigmas, pipe_sigmas)
    cond = kontext.encode_prompt(PROMPTS, images=image)
    assert cond.image_latents.shape == (2, 4, 8, 12)
    plain = kontext.encode_prompt(PROMPTS)
    x = torch.randn((2, *kontext.latent_shape()), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the reference image changes the prediction
        assert (kontext.velocity(x, 0.5, cond) - kontext.velocity(x, 0.5, plain)).abs().max() > 1e-4


def test_kontext_reference_images_lookup(kontext):
    image = _image()
    kontext.reference_images = {PROMPTS[0]: image}
    try:
        with pytest.raises(KeyError, match="no reference image"):
            kontext.encode_prompt(PROMPTS)
        kontext.reference_images["*"] = _image(seed=4)
        cond = kontext.encode_prompt(PROMPTS)
    finally:
        kontext.reference_images = None
    torch.testing.assert_close(cond.image_latents[0], kontext.encode_prompt(PROMPTS[:1], images=image).image_latents[0])


@pytest.mark.parametrize("trainer", ["flow_grpo", "crd", "nft"])
def test_one_epoch_trains_every_lora_weight(trainer, tmp_path):
    assert_one_epoch_trains_every_lora_weight(trainer, lambda: tiny_flux(seed=0), tmp_path,
                                              sampler=dict(guidance=3.5))


def test_one_epoch_of_kontext_with_an_input_image(tmp_path):
    def make():
        model = tiny_flux(seed=1, kontext=True)
        model.reference_images = {"*": _image()}
        return model

    assert_one_epoch_trains_every_lora_weight("flow_grpo", make, tmp_path, sampler=dict(guidance=2.5))


def test_load_model_recognises_flux_and_kontext(dev, kontext, tmp_path):
    loaded = assert_load_model_recognises(dev.pipeline(), tmp_path / "dev", FluxAdapter)
    x = torch.randn((1, *dev.latent_shape()), generator=torch.Generator().manual_seed(0))
    cond = dev.encode_prompt(PROMPTS[:1])
    loaded.max_sequence_length = dev.max_sequence_length
    torch.testing.assert_close(loaded.velocity(x, 0.5, loaded.encode_prompt(PROMPTS[:1])), dev.velocity(x, 0.5, cond))
    assert_load_model_recognises(kontext.pipeline(), tmp_path / "kontext", FluxKontextAdapter)


def test_unknown_family_names_the_supported_ones(tmp_path):
    from samplers.models import load_model

    (tmp_path / "model_index.json").write_text('{"_class_name": "SomeOtherPipeline"}')
    with pytest.raises(ValueError, match="unsupported pipeline class 'SomeOtherPipeline'.*FluxPipeline"):
        load_model(tmp_path)


def test_a_saved_kontext_folder_carries_its_reference_pairs(kontext, tmp_path):
    """genalign.json's "reference_images" names a JSONL of (prompt, image) pairs: a trainer that
    only passes prompts then edits the right image for each."""
    import json

    from PIL import Image

    from samplers.models import load_model

    kontext.save_pretrained(tmp_path / "model")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "model" / "red.png")
    (tmp_path / "model" / "pairs.jsonl").write_text(json.dumps({"prompt": PROMPTS[0], "image": "red.png"}) + "\n")
    settings = json.loads((tmp_path / "model" / "genalign.json").read_text())
    settings["reference_images"] = "pairs.jsonl"
    (tmp_path / "model" / "genalign.json").write_text(json.dumps(settings))
    loaded = load_model(tmp_path / "model")
    assert loaded.reference_images == {PROMPTS[0]: str(tmp_path / "model" / "red.png")}
    cond = loaded.encode_prompt(PROMPTS[:1])
    red = torch.zeros(3, 16, 16) + torch.tensor([200, 30, 30]).view(3, 1, 1) / 255
    torch.testing.assert_close(cond.image_latents, loaded.encode_prompt(PROMPTS[:1], images=red).image_latents)
