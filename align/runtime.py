"""What every trainer sets up the same way: the accelerator and its precision, the attention
backend, the model, and its trainable weights (LoRA through peft, or a full fine-tune with a
frozen reference copy). Flow-GRPO, GDRO and CRD share these.

CUDA-only options degrade on a CPU with a warning: fp16/bf16 -> fp32, xformers -> torch SDPA.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import warnings
from dataclasses import dataclass

import torch

from .config import doc

__all__ = ["LoraSettings", "WEIGHT_DTYPES", "resolve_mixed_precision", "resolve_attention_backend",
           "make_accelerator", "load_flow_model", "setup_trainable", "configure_transformer", "transformer_as",
           "reference_policy"]

# accelerate's mixed_precision -> dtype of the frozen weights (trainable weights stay fp32)
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoraSettings:
    """LoRA on the transformer (peft), or a full fine-tune with rank 0."""

    rank: int = doc(32, "LoRA rank; 0 fine-tunes every transformer weight (reference = a frozen copy).")
    alpha: int | None = doc(64, "LoRA alpha (the update is scaled by alpha / rank); null = 2 * rank.")
    targets: list[str] | None = doc(None, "Module name suffixes that get LoRA; null = the model family's "
                                          "defaults (SD3: attention q/k/v/out and the add_* context projections, "
                                          "as in Flow-GRPO; Wan: self- and cross-attention q/k/v/out).")

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError("lora.rank must be >= 0 (0 = full fine-tune)")
        if self.rank and self.targets is not None and not self.targets:
            raise ValueError("lora.targets must name at least one module (or be null for the model's defaults)")


def resolve_mixed_precision(name: str, cuda_available: bool | None = None) -> str:
    """accelerate's mixed_precision: fp16/bf16 only with CUDA (on a CPU they are slower and fp16
    kernels are missing), else a warning and 'no' (fp32)."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if name in ("fp32", "no"):
        return "no"
    if name not in ("fp16", "bf16"):
        raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {name!r}")
    if not cuda:
        warnings.warn(f"mixed_precision={name} needs CUDA; training in fp32 on the CPU", stacklevel=2)
        return "no"
    return name


def resolve_attention_backend(name: str, cuda_available: bool | None = None) -> str:
    """'sdpa' or 'xformers'; xformers only when it is installed AND CUDA is available (its kernels
    raise on a CPU), else a warning and 'sdpa'."""
    if name == "sdpa":
        return "sdpa"
    if name != "xformers":
        raise ValueError(f"attention_backend must be 'sdpa' or 'xformers', got {name!r}")
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    installed = importlib.util.find_spec("xformers") is not None
    if installed and cuda:
        return "xformers"
    missing = " and ".join(what for what, ok in (("the xformers package", installed), ("CUDA", cuda)) if not ok)
    warnings.warn(f"attention_backend='xformers' needs {missing}; using torch SDPA instead", stacklevel=2)
    return "sdpa"


def make_accelerator(mixed_precision: str = "no", find_unused_parameters: bool = False):
    """An Accelerator for CPU or CUDA (DDP kwargs set; mixed precision resolved for the device)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # cpu=True without CUDA: otherwise `accelerate launch --multi_gpu` on a CPU machine runs
    # every rank as its own single-process job (ENVIRONMENT.md).
    return Accelerator(cpu=not torch.cuda.is_available(),
                       mixed_precision=resolve_mixed_precision(mixed_precision),
                       kwargs_handlers=[DistributedDataParallelKwargs(
                           find_unused_parameters=find_unused_parameters)])


def load_flow_model(spec: str, device: torch.device | str = "cpu"):
    """A FlowModel adapter: "toy:<size>" / "toy_video:<size>" (fresh random image / video toy model,
    tests), "shapesworld", "shapesworld_video", a folder or hub id."""
    from samplers.progress import status

    status(f"loading model {spec} on {device} ...")
    if spec.startswith("toy:"):  # a freshly initialised toy model of the named size (tests, smoke runs)
        from samplers.models.shapesworld import toy_components

        return toy_components(spec.removeprefix("toy:"), seed=0).to(device)
    if spec.startswith("toy_video:"):
        from samplers.models.shapesworld_video import toy_video_components

        return toy_video_components(spec.removeprefix("toy_video:"), seed=0).to(device)
    from samplers.models import load_model

    return load_model(spec, device=device)


def setup_trainable(model, lora: LoraSettings, weight_dtype: torch.dtype, frozen_reference: bool):
    """Make LoRA (or the whole transformer) trainable; returns (named trainable params, reference
    transformer for the full fine-tune's KL, made when `frozen_reference`, else None)."""
    model.requires_grad_(False).eval()
    reference = None
    if lora.rank > 0:
        if weight_dtype != torch.float32:
            model.transformer.to(weight_dtype)
        model.add_lora(rank=lora.rank, alpha=lora.alpha, target_modules=lora.targets)
        trainable = {n: p for n, p in model.transformer.named_parameters() if "lora_" in n}
        for p in trainable.values():
            p.data = p.data.float()  # LoRA weights stay fp32 under mixed precision
            p.requires_grad_(True)
    else:
        if frozen_reference:
            reference = copy.deepcopy(model.transformer).to(weight_dtype).requires_grad_(False).eval()
        model.transformer.requires_grad_(True)
        trainable = dict(model.transformer.named_parameters())
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):  # Wan has one text encoder
        module = getattr(model, name, None)
        if module is not None and weight_dtype != torch.float32:
            module.to(weight_dtype)
    return trainable, reference


@contextlib.contextmanager
def transformer_as(model, module):
    """Run the adapter's forward passes through `module` (the DDP-wrapped or the reference
    transformer) inside the block; the adapter keeps the raw module otherwise."""
    raw = model.transformer
    model.transformer = module
    try:
        yield
    finally:
        model.transformer = raw


def reference_policy(model, reference):
    """Flow-GRPO's reference: the base model with LoRA disabled, or the frozen copy (full FT)."""
    return model.lora_disabled() if reference is None else transformer_as(model, reference)


def configure_transformer(model, attention_backend: str = "sdpa", gradient_checkpointing: bool = False) -> None:
    """Attention backend (xformers only where it runs) and gradient checkpointing of the transformer."""
    if resolve_attention_backend(attention_backend) == "xformers":
        model.transformer.enable_xformers_memory_efficient_attention()
    if gradient_checkpointing:
        model.transformer.enable_gradient_checkpointing()
