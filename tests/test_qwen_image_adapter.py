"""Qwen-Image adapter against diffusers' QwenImagePipeline (true CFG with its norm-preserving rescale)."""

from __future__ import annotations

import pytest
import torch
from adapter_checks import (assert_load_model_recognises, assert_one_epoch_trains_every_lora_weight,
                            assert_sde_rescore_is_exact, lora_model)

from samplers.models.flux import pack_latents
from samplers.models.qwen_image import QwenImageAdapter, norm_preserving_cfg
from samplers.models.tiny import tiny_qwen_image
from samplers.rollout import rollout

PROMPTS = ["a red circle above a blue square", "two green triangles"]


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen_image(seed=0)


def _compare(model, pipe, height, width, guidance, steps=3):
    noise = torch.randn((2, *model.latent_shape(height, width)), generator=torch.Generator().manual_seed(0))
    negative = "blurry" if guidance > 1 else None
    expected = pipe(prompt=PROMPTS, negative_prompt=negative, true_cfg_scale=guidance, height=height, width=width,
                    num_inference_steps=steps, latents=pack_latents(noise), output_type="pt").images
    cond = model.encode_prompt(PROMPTS, negative_prompt=negative)
    sigmas = model.sigmas(steps, height, width)
    assert torch.equal(sigmas, pipe.scheduler.sigmas)  # bit for bit (dynamic shift, shift_terminal)
    traj = rollout(model, cond, sigmas, step_types="ode", guidance=guidance, initial_noise=noise)
    return model.decode(traj.final), expected


def test_encode_prompt_matches_pipeline(qwen):
    pe, mask = qwen.pipeline().encode_prompt(PROMPTS, device="cpu", max_sequence_length=512)
    cond = qwen.encode_prompt(PROMPTS)
    torch.testing.assert_close(cond.prompt_embeds, pe, atol=1e-6, rtol=0)
    assert torch.equal(cond.prompt_mask, mask) and mask[1].sum() < mask[0].sum()  # the shorter prompt is padded
    one, one_mask = qwen.pipeline().encode_prompt(PROMPTS[:1], device="cpu")
    assert one_mask is None and qwen.encode_prompt(PROMPTS[:1]).prompt_mask is None


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("size", [(16, 16), (24, 32)])
def test_ode_rollout_reproduces_qwen_image_pipeline(qwen, guidance, size):
    ours, expected = _compare(qwen, qwen.pipeline(), *size, guidance)
    assert ours.shape == expected.shape == (2, 3, *size)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_cfg_rescale_keeps_the_conditional_norm():
    c, u = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    v = norm_preserving_cfg(c, u, 4.0)
    torch.testing.assert_close(v.norm(dim=-1), c.norm(dim=-1))
    direction = u + 4.0 * (c - u)
    torch.testing.assert_close(v / v.norm(dim=-1, keepdim=True), direction / direction.norm(dim=-1, keepdim=True))


def test_sde_rescore_is_exact(qwen):
    assert_sde_rescore_is_exact(qwen, qwen.encode_prompt(PROMPTS, negative_prompt=" "), qwen.sigmas(4), guidance=4.0)


def test_lora_file_loads_into_the_pipeline(qwen, tmp_path):
    tuned = lora_model(qwen)
    tuned.save_lora(tmp_path / "lora")
    fresh = tiny_qwen_image(seed=0)
    pipe = fresh.pipeline()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    ours, expected = _compare(tuned, pipe, 16, 16, 4.0, steps=2)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    base, _ = _compare(qwen, qwen.pipeline(), 16, 16, 4.0, steps=2)
    assert (ours - base).abs().max() > 1e-4


# The last block's text stream is discarded (only image tokens are output), so its text-query and
# text-output LoRA get exactly zero gradient (as SD3's context_pre_only block, and in the 60-layer
# model); every other LoRA weight must move.
LAST_BLOCK_TEXT_PATH = ["transformer_blocks.1.attn.add_q_proj.lora_B.default.weight",
                        "transformer_blocks.1.attn.to_add_out.lora_A.default.weight",
                        "transformer_blocks.1.attn.to_add_out.lora_B.default.weight"]


@pytest.mark.parametrize("trainer", ["flow_grpo", "crd", "nft"])
def test_one_epoch_trains_every_lora_weight(trainer, tmp_path):
    assert_one_epoch_trains_every_lora_weight(trainer, lambda: tiny_qwen_image(seed=0), tmp_path,
                                              no_gradient=LAST_BLOCK_TEXT_PATH,
                                              sampler=dict(guidance=4.0, negative_prompt=" "))


def test_load_model_recognises_qwen_image(qwen, tmp_path):
    loaded = assert_load_model_recognises(qwen.pipeline(), tmp_path, QwenImageAdapter)
    x = torch.randn((1, *qwen.latent_shape()), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, 0.5, loaded.encode_prompt(PROMPTS[:1])),
                                   qwen.velocity(x, 0.5, qwen.encode_prompt(PROMPTS[:1])), atol=1e-6, rtol=0)
