"""The GPU configs of the diffusers families (configs/<family>/): each loads and validates, runs in
bf16 with gradient checkpointing, states its memory, and shards (FSDP / ZeRO) the 12B+ models."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.config import load_any_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# family folder -> the model is 12B or larger (FLUX.1 12B, Qwen-Image 20B, Wan2.2 2 x 14B, HunyuanVideo 13B)
FAMILIES = {"flux": True, "flux_kontext": True, "qwen_image": True, "qwen_image_edit": True, "wan22": True,
            "hunyuan_video": True, "z_image": False, "flux2": False}
LARGE_FILES = {"flow_grpo_dev_pickscore.yaml"}  # FLUX.2 [dev] 32B beside klein 4B in configs/flux2
FILES = sorted(p for family in FAMILIES for p in (CONFIGS / family).glob("*.yaml"))


def test_every_family_has_a_config():
    assert {p.parent.name for p in FILES} == set(FAMILIES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_family_config_loads_and_follows_the_gpu_rules(path):
    name, cfg = load_any_config(path)
    assert name == "flow_grpo"
    assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(line.startswith("# Memory:") for line in header), f"{path}: no '# Memory:' note"
    sharded = "accelerate/fsdp.yaml" in header[0] or "deepspeed" in header[0]
    large = FAMILIES[path.parent.name] or path.name in LARGE_FILES
    assert sharded == large, f"{path}: 12B+ models shard with FSDP/ZeRO, smaller ones use DDP"
    if cfg.lora.rank == 0:
        assert cfg.kl_beta == 0, "full fine-tunes here follow DanceGRPO (no reference copy)"
