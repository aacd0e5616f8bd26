"""Flow-GRPO's CFG detach: the training forward's unconditional branch gets no gradient."""

from __future__ import annotations

import torch


def _output_grads(model, detach_uncond: bool):
    """(velocity, gradient of the loss w.r.t. the transformer's [uncond; cond] output, weight gradient)."""
    captured = {}

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output.sample
        out.register_hook(lambda g: captured.__setitem__("grad", g))

    handle = model.transformer.register_forward_hook(hook)
    weight = model.transformer.proj_out.weight
    weight.requires_grad_(True)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, *model.latent_shape(None, None), generator=g)
        cond = model.encode_prompt(["a photo of a red circle", "two squares"], negative_prompt="")
        v = model.velocity(x, torch.tensor([0.7, 0.4]), cond, 4.5, detach_uncond=detach_uncond)
        v.square().sum().backward()
        return v.detach(), captured["grad"], weight.grad.clone()
    finally:
        handle.remove()
        weight.grad = None
        weight.requires_grad_(False)


def test_detached_unconditional_branch_gets_no_gradient(tiny_sd3):
    v_detached, grad_detached, w_detached = _output_grads(tiny_sd3, True)
    v_full, grad_full, w_full = _output_grads(tiny_sd3, False)
    torch.testing.assert_close(v_detached, v_full, rtol=0, atol=0)  # same value
    uncond, cond = grad_detached.chunk(2)  # the CFG batch is [uncond; cond]
    assert uncond.abs().max() == 0 and cond.abs().max() > 0
    assert grad_full.chunk(2)[0].abs().max() > 0  # the old behaviour: both branches get gradient
    # detaching changes the weight gradient (it flows through the conditional branch only)
    assert not torch.allclose(w_detached, w_full)


def test_flow_grpo_trains_through_the_conditional_branch_by_default():
    from align.flow_grpo import FlowGRPOConfig

    assert FlowGRPOConfig().cfg_detach_uncond is True
