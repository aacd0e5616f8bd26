"""Qwen-Image-Edit-2509 / Plus adapter against diffusers' QwenImageEditPlusPipeline: the input
image resized by the pipeline's processor to 384 x 384 area for the VL encoder and to 1024 x 1024
area for the VAE (the pipeline batches one prompt with its image)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapter_checks import assert_load_model_recognises, assert_sde_rescore_is_exact
from PIL import Image

from samplers.models.flux import pack_latents
from samplers.models.qwen_image import QwenImageEditPlusAdapter
from samplers.models.tiny import tiny_qwen_image_edit
from samplers.rollout import rollout

PROMPT = ["make the circle red"]


@pytest.fixture(scope="module")
def plus():
    return tiny_qwen_image_edit(seed=0, plus=True)


@pytest.fixture(scope="module")
def image():
    # not at the pipeline's areas: both resizes (VL 384 px, VAE 1024 px area) are exercised
    return Image.fromarray((np.random.RandomState(0).rand(800, 1024, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def cond(plus, image):
    return plus.encode_prompt(PROMPT, negative_prompt=" ", images=image)


def test_encode_prompt_matches_pipeline(plus, image, cond):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    pipe = plus.pipeline()
    w, h = calculate_dimensions(384 * 384, 1024 / 800)[:2]
    pe, _ = pipe.encode_prompt(PROMPT, image=[pipe.image_processor.resize(image, h, w)], device="cpu")
    torch.testing.assert_close(cond.prompt_embeds, pe, atol=1e-6, rtol=0)
    vw, vh = calculate_dimensions(1024 * 1024, 1024 / 800)[:2]
    assert (vw, vh) == (1152, 896) and cond.image_latents.shape[-2:] == (vh // 8, vw // 8)  # ~1024 x 1024 area


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_ode_rollout_reproduces_the_edit_plus_pipeline(plus, image, cond, guidance):
    noise = torch.randn((1, *plus.latent_shape(32, 48)), generator=torch.Generator().manual_seed(0))
    expected = plus.pipeline()(image=[image], prompt=PROMPT, negative_prompt=[" "] if guidance > 1 else None,
                               true_cfg_scale=guidance, height=32, width=48, num_inference_steps=2,
                               latents=pack_latents(noise), output_type="pt").images
    traj = rollout(plus, cond, plus.sigmas(2, 32, 48), step_types="ode", guidance=guidance, initial_noise=noise)
    torch.testing.assert_close(plus.decode(traj.final), expected, atol=1e-5, rtol=1e-5)


def test_sde_rescore_and_load_model(plus, cond, tmp_path):
    assert_sde_rescore_is_exact(plus, cond.repeat_interleave(2), plus.sigmas(3), guidance=4.0)
    assert_load_model_recognises(plus.pipeline(), tmp_path, QwenImageEditPlusAdapter)


def test_one_epoch_with_an_input_image_trains_every_lora_weight(tmp_path):
    from adapter_checks import assert_one_epoch_trains_every_lora_weight
    from test_qwen_image_edit_adapter import LAST_BLOCK_TEXT_PATH

    small = Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8))

    def make():
        model = tiny_qwen_image_edit(seed=0, reference_area=64 * 64, plus=True)
        model.defaults["condition_area"] = 56 * 56
        model.reference_images = {"*": small}
        return model

    assert_one_epoch_trains_every_lora_weight("flow_grpo", make, tmp_path, no_gradient=LAST_BLOCK_TEXT_PATH,
                                              sampler=dict(guidance=4.0, negative_prompt=" "))
