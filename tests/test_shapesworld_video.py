"""The shipped ShapesWorld-Video base model (present, unchanged, loadable, samples clips) and
`align.pretrain_video_toy` end to end at a few steps (runs, saves a loadable model, is seeded)."""

from __future__ import annotations

import json

import pytest
import torch

from samplers.generate import generate
from samplers.models import WanAdapter, load_model
from samplers.models.shapesworld_video import (DEFAULTS, FRAME_SIZE, NUM_FRAMES, SHIPPED_SHA256, VIDEO_DIR,
                                               weights_checksum)

shipped = pytest.mark.skipif(not (VIDEO_DIR / "transformer").is_dir(),
                             reason="no shipped ShapesWorld-Video weights (python -m align.pretrain_video_toy)")


@shipped
def test_shipped_weights_checksum_and_size():
    files = list(VIDEO_DIR.rglob("*.safetensors"))
    assert len(files) == 3, files  # transformer, vae, text encoder
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20
    assert weights_checksum() == SHIPPED_SHA256, \
        "shipped ShapesWorld-Video changed: rebuild with `python -m align.pretrain_video_toy` and update SHIPPED_SHA256"
    settings = json.loads((VIDEO_DIR / "genalign.json").read_text())
    assert settings["pretrain"]["seed"] == 0 and settings["tokenizer"] == "clip"


@shipped
def test_shipped_model_loads_by_name_and_generates_clips():
    model = load_model("shapesworld_video")
    assert isinstance(model, WanAdapter) and model.defaults == DEFAULTS
    assert model.video_size == (NUM_FRAMES, FRAME_SIZE, FRAME_SIZE)
    assert model.latent_shape() == (4, NUM_FRAMES, FRAME_SIZE // 4, FRAME_SIZE // 4)
    videos = generate(model, ["a red circle moving right", "two blue squares moving up"], seeds=[0, 1],
                      num_steps=2)
    assert videos.shape == (2, 3, NUM_FRAMES, FRAME_SIZE, FRAME_SIZE)
    assert torch.isfinite(videos).all() and 0 <= videos.min() and videos.max() <= 1
    # the folder path loads the same model
    folder = load_model(VIDEO_DIR)
    for a, b in zip(model.transformer.parameters(), folder.transformer.parameters()):
        assert torch.equal(a, b)


def test_pretrain_video_toy_is_reproducible_and_loadable(tmp_path):
    from align.pretrain_video_toy import pretrain_video_toy

    kwargs = dict(seed=3, dataset_size=8, steps=2, batch=4, warmup=1, threads=1, eval_num=0)
    a = pretrain_video_toy(tmp_path / "a", **kwargs)
    b = pretrain_video_toy(tmp_path / "b", **kwargs)
    assert weights_checksum(a) == weights_checksum(b)
    model = load_model(a)
    assert isinstance(model, WanAdapter) and model.coord_channels  # the default recipe's t / y / x input channels
    videos = generate(model, ["a red circle moving left"], num_steps=2)
    assert videos.shape == (1, 3, NUM_FRAMES, FRAME_SIZE, FRAME_SIZE)
    log = (a / "pretrain_log.csv").read_text().splitlines()
    assert log[0] == "phase,step,elapsed_s,metric,value" and any(l.startswith("done,") for l in log)
    assert not (a / "eval_log.json").exists() and not (tmp_path / "a.partial").exists()


def test_sample_timesteps_shift_matches_sd3_analytic():
    import math

    from align.pretrain_video_toy import sample_timesteps

    n = 200_000
    plain = sample_timesteps(n, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.sigmoid(torch.randn(n, generator=torch.Generator().manual_seed(0))))
    shifted = sample_timesteps(n, torch.Generator().manual_seed(0), shift=3.0)
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain)) and 0 < shifted.min() and shifted.max() < 1
    # t' > 0.9  <=>  t > 0.75  <=>  z > logit(0.75) = ln 3, with z ~ N(0, 1)
    tail = lambda x: 0.5 * math.erfc(x / math.sqrt(2))  # noqa: E731
    assert abs((plain > 0.9).float().mean().item() - tail(math.log(9))) < 0.002   # 1.4%
    assert abs((shifted > 0.9).float().mean().item() - tail(math.log(3))) < 0.004  # 13.6%
