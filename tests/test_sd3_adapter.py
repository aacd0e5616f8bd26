"""The SD3 adapter against diffusers itself: same tokens, same images, same LoRA files."""

from __future__ import annotations

import copy

import pytest
import torch

from samplers.generate import generate
from samplers.models import SD3Adapter, load_model
from samplers.models.clip_tokenizer import build_clip_tokenizer
from samplers.rollout import rollout
from samplers.schedules import flow_sigmas


def test_offline_clip_tokenizer_is_exact():
    tok = build_clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def _pipeline(model: SD3Adapter):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=model.transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=model.vae,
        text_encoder=model.text_encoder, tokenizer=model.tokenizers[0],
        text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizers[1],
        text_encoder_3=None, tokenizer_3=None)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_ode_rollout_reproduces_diffusers_pipeline(tiny_sd3, guidance):
    prompts = ["a photo of a red circle", "a photo of two squares"]
    pipe = _pipeline(tiny_sd3)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    expected = pipe(prompts, num_inference_steps=4, guidance_scale=guidance, generator=gen,
                    max_sequence_length=tiny_sd3.max_sequence_length, output_type="pt").images
    # the pipeline draws its initial latents with randn on the generator: replay that draw
    noise = torch.randn((2, *tiny_sd3.latent_shape()), generator=torch.Generator().manual_seed(0))
    cond = tiny_sd3.encode_prompt(prompts, negative_prompt="" if guidance > 1 else None)
    traj = rollout(tiny_sd3, cond, flow_sigmas(4, shift=3.0), step_types="ode", guidance=guidance,
                   initial_noise=noise)
    ours = tiny_sd3.decode(traj.final)
    assert ours.shape == expected.shape == (2, 3, 16, 16)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_encode_prompt_matches_pipeline(tiny_sd3):
    pipe = _pipeline(tiny_sd3)
    pe, npe, pooled, npooled = pipe.encode_prompt("a photo of a blue triangle", None, None, device="cpu",
                                                  do_classifier_free_guidance=True, max_sequence_length=0)
    cond = tiny_sd3.encode_prompt(["a photo of a blue triangle"])
    for a, b in [(cond.prompt_embeds, pe), (cond.negative_prompt_embeds, npe), (cond.pooled, pooled),
                 (cond.negative_pooled, npooled)]:
        torch.testing.assert_close(a, b)


def test_save_and_from_pretrained_round_trip(tiny_sd3, tmp_path):
    tiny_sd3.save_pretrained(tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert isinstance(loaded, SD3Adapter)
    assert loaded.tokenizers[0].model_max_length == tiny_sd3.tokenizers[0].model_max_length
    assert loaded.defaults == tiny_sd3.defaults
    a = generate(tiny_sd3, ["a photo of a circle"] * 2, seeds=[3, 4], num_steps=3)
    b = generate(loaded, ["a photo of a circle"] * 2, seeds=[3, 4], num_steps=3)
    torch.testing.assert_close(a, b)


def test_generate_is_batch_independent(tiny_sd3):
    prompts = ["a photo of a circle", "a photo of a square", "a photo of a triangle"]
    together = generate(tiny_sd3, prompts, seeds=[7, 8, 9], num_steps=3, batch_size=3)
    apart = generate(tiny_sd3, prompts, seeds=[7, 8, 9], num_steps=3, batch_size=1)
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-5)
    assert together.min() >= 0 and together.max() <= 1


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a diffusers model folder"):
        load_model(tmp_path)


def test_lora_saves_in_the_format_diffusers_loads(tiny_sd3, tmp_path):
    model = copy.deepcopy(tiny_sd3)
    model.add_lora(rank=4)
    with torch.no_grad():  # LoRA B starts at zero: perturb it so the adapter changes the output
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    cond = model.encode_prompt(["a photo of a red circle"], negative_prompt=None)
    x = torch.randn(1, *model.latent_shape(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v_lora = model.velocity(x, 0.5, cond)
        with model.lora_disabled():
            v_base = model.velocity(x, 0.5, cond)
    assert not torch.allclose(v_lora, v_base)
    torch.testing.assert_close(v_base, tiny_sd3.velocity(x, 0.5, cond))

    path = model.save_lora(tmp_path / "lora")
    assert path.is_file()
    pipe = _pipeline(copy.deepcopy(tiny_sd3))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        v_diffusers = pipe.transformer(hidden_states=x, timestep=torch.tensor([500.0]),
                                       encoder_hidden_states=cond.prompt_embeds,
                                       pooled_projections=cond.pooled).sample
    torch.testing.assert_close(v_diffusers, v_lora, atol=1e-5, rtol=1e-5)

    fresh = copy.deepcopy(tiny_sd3)
    fresh.load_lora(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(x, 0.5, cond), v_lora, atol=1e-5, rtol=1e-5)


def test_load_model_reads_a_diffusers_pipeline_folder(tiny_sd3, tmp_path):
    """A folder written by diffusers itself (model_index.json, tokenizers, no genalign.json) loads
    through `load_model` and samples exactly what the pipeline samples (T5 slot: 256 zero tokens)."""
    pipe = _pipeline(tiny_sd3)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "pipe")
    model = load_model(tmp_path / "pipe")
    assert model.max_sequence_length == 256 and model.text_encoder_3 is None
    expected = pipe("a photo of a green square", num_inference_steps=3, guidance_scale=4.5,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images
    noise = torch.randn((1, *model.latent_shape()), generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompt(["a photo of a green square"])
    traj = rollout(model, cond, flow_sigmas(3, shift=3.0), step_types="ode", guidance=4.5, initial_noise=noise)
    torch.testing.assert_close(model.decode(traj.final), expected, atol=1e-5, rtol=1e-5)
