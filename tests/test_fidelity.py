"""The render gap: a reward-blind distance between images and renders of the same prompts."""

from __future__ import annotations

import numpy as np

from eval.shapes import prompts, render, render_gap, scene_for_prompt
from eval.shapes.fidelity import wasserstein


def _renders(metas, offset):
    return np.stack([render(scene_for_prompt(m, rng=offset + i)) for i, m in enumerate(metas)])


def test_renders_of_other_scenes_are_at_zero_and_drift_is_measured_in_rgb_units():
    metas = prompts("test")[:24]
    clean = _renders(metas, 500)
    assert render_gap(clean, metas, range(24)) < 0.05  # other scenes of the same prompts
    tinted = np.clip(clean.astype(int) + np.array([12, -6, 0]), 0, 255).astype(np.uint8)  # a colour cast
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 8, clean.shape), 0, 255).astype(np.uint8)
    assert 5 < render_gap(tinted, metas, range(24)) < 14  # at most the cast's length, 13.4
    assert render_gap(noisy, metas, range(24)) > 3


def test_wasserstein_of_shifted_samples_is_the_shift():
    a = np.random.default_rng(1).normal(0, 1, 10_000)
    assert abs(wasserstein(a, a + 2.5) - 2.5) < 1e-6
