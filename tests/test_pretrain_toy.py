"""`align pretrain-toy` end to end at a few steps: it runs, saves a loadable model, is seeded."""

from __future__ import annotations

from align.pretrain_toy import pretrain_toy
from samplers.generate import generate
from samplers.models import load_model
from samplers.models.shapesworld import weights_checksum


def test_pretrain_toy_is_reproducible_and_loadable(tmp_path):
    kwargs = dict(seed=3, vae_steps=2, dataset_size=32, steps=2, batch=8, threads=1)
    a = pretrain_toy(tmp_path / "a", **kwargs)
    b = pretrain_toy(tmp_path / "b", **kwargs)
    assert weights_checksum(a) == weights_checksum(b)
    model = load_model(a)
    assert model.vae.config.scaling_factor != 1.0  # set from the encoded data's std
    images = generate(model, ["a photo of a red circle"], num_steps=2)
    assert images.shape == (1, 3, 64, 64)
    log = (a / "pretrain_log.csv").read_text().splitlines()
    assert log[0] == "phase,step,elapsed_s,metric,value" and any(l.startswith("done,") for l in log)
