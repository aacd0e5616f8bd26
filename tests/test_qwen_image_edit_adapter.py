"""Qwen-Image-Edit adapter against diffusers' QwenImageEditPipeline: the input image through the
VL encoder and as latent tokens. The pipeline resizes every input to ~1024 x 1024, so the tests
that run it share one encoded 1024 px image; the trainer tests use a small reference area."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from adapter_checks import (assert_load_model_recognises, assert_one_epoch_trains_every_lora_weight,
                            assert_sde_rescore_is_exact, lora_model)
from PIL import Image

from samplers.models.flux import pack_latents, unpack_latents
from samplers.models.qwen_image import QwenImageEditAdapter
from samplers.models.tiny import tiny_qwen_image_edit
from samplers.rollout import rollout

PROMPT = ["make the circle red"]
LAST_BLOCK_TEXT_PATH = ["transformer_blocks.1.attn.add_q_proj.lora_B.default.weight",
                        "transformer_blocks.1.attn.to_add_out.lora_A.default.weight",
                        "transformer_blocks.1.attn.to_add_out.lora_B.default.weight"]


@pytest.fixture(scope="module")
def edit():
    return tiny_qwen_image_edit(seed=0)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.RandomState(0).rand(1024, 1024, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def cond(edit, image):
    return edit.encode_prompt(PROMPT, negative_prompt=" ", images=image)


def test_encode_prompt_matches_pipeline(edit, image, cond):
    pipe = edit.pipeline()
    pe, mask = pipe.encode_prompt(PROMPT, image=[image], device="cpu")
    assert pe.shape[1] > 1000  # ~1300 image tokens of the 1024 px input, then the prompt
    torch.testing.assert_close(cond.prompt_embeds, pe, atol=1e-6, rtol=0)
    latents = pipe._encode_vae_image(pipe.image_processor.preprocess(image, 1024, 1024).unsqueeze(2), None)
    torch.testing.assert_close(cond.image_latents, latents[:, :, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_ode_rollout_reproduces_the_edit_pipeline(edit, image, cond, guidance, size):
    h, w = size
    noise = torch.randn((1, *edit.latent_shape(h, w)), generator=torch.Generator().manual_seed(0))
    expected = edit.pipeline()(image=[image], prompt=PROMPT, negative_prompt=[" "] if guidance > 1 else None,
                               true_cfg_scale=guidance, height=h, width=w, num_inference_steps=2,
                               latents=pack_latents(noise), output_type="pt").images
    sigmas = edit.sigmas(2, h, w)
    traj = rollout(edit, cond, sigmas, step_types="ode", guidance=guidance, initial_noise=noise)
    torch.testing.assert_close(edit.decode(traj.final), expected, atol=1e-5, rtol=1e-5)


def test_the_input_image_changes_the_prediction_and_is_required(edit, cond):
    x = torch.randn((1, *edit.latent_shape()), generator=torch.Generator().manual_seed(1))
    without = dataclasses.replace(cond, image_latents=None)
    with torch.no_grad():
        assert (edit.velocity(x, 0.5, cond) - edit.velocity(x, 0.5, without)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="pass images="):
        edit.encode_prompt(PROMPT)


def test_sde_rescore_is_exact(edit, cond):
    assert_sde_rescore_is_exact(edit, cond.repeat_interleave(2), edit.sigmas(3), guidance=4.0)


def test_lora_file_loads_into_the_pipeline(edit, cond, tmp_path):
    tuned = lora_model(edit)
    tuned.save_lora(tmp_path / "lora")
    pipe = tiny_qwen_image_edit(seed=0).pipeline()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    x = torch.randn((1, *edit.latent_shape()), generator=torch.Generator().manual_seed(2))
    ref = cond.image_latents
    with torch.no_grad():  # the pipeline's transformer, called as QwenImageEditPipeline calls it
        v_pipe = pipe.transformer(hidden_states=torch.cat([pack_latents(x), pack_latents(ref)], 1),
                                  timestep=torch.tensor([0.5]), encoder_hidden_states=cond.prompt_embeds,
                                  encoder_hidden_states_mask=None, img_shapes=[[(1, 2, 2), (1, 64, 64)]],
                                  return_dict=False)[0][:, :4]
        v_ours = tuned.velocity(x, 0.5, cond, 1.0)
        assert (v_ours - edit.velocity(x, 0.5, cond, 1.0)).abs().max() > 1e-4
    torch.testing.assert_close(unpack_latents(v_pipe, 4, 4), v_ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("trainer", ["flow_grpo", "crd", "nft"])
def test_one_epoch_with_an_input_image_trains_every_lora_weight(trainer, tmp_path):
    small = Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8))

    def make():
        model = tiny_qwen_image_edit(seed=0, reference_area=64 * 64)
        model.reference_images = {"*": small}
        return model

    assert_one_epoch_trains_every_lora_weight(trainer, make, tmp_path, no_gradient=LAST_BLOCK_TEXT_PATH,
                                              sampler=dict(guidance=4.0, negative_prompt=" "))


def test_load_model_recognises_qwen_image_edit(edit, tmp_path):
    loaded = assert_load_model_recognises(edit.pipeline(), tmp_path, QwenImageEditAdapter)
    assert type(loaded.processor).__name__ == "Qwen2VLProcessor"
