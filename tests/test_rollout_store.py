"""The rollout store: whole groups in, whole groups out; atomic shards with checksums; a real
SIGKILL mid-run resumes without regenerating finished groups; a corrupt shard is named and
the other shards stay usable."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from align.cli import main
from align.config import load_config
from align.rollout_store import MANIFEST, CorruptShardError, RolloutConfig, RolloutStore, build_store

REPO = Path(__file__).resolve().parents[1]
YAML = REPO / "configs" / "shapes" / "rollout.yaml"
# 16 px random toy model, continuous reward (saturation) plus the verifier and its extras
TINY = ["model=toy:test", "rewards=[shapes_saturation,shapes_geneval]", "group_size=3", "num_steps=2",
        "batch_size=4", "device=cpu", "quiet=true"]


def tiny_config(out: Path, *extra: str) -> RolloutConfig:
    return load_config(RolloutConfig, YAML, [*TINY, "num_groups=5", "groups_per_shard=2", *extra,
                                             f"output_dir={out}"])


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rollouts") / "store"
    build_store(tiny_config(out))
    return out


def _copy(store_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(store_dir, tmp_path / "store"))


def test_store_holds_whole_scored_groups(store_dir):
    store = RolloutStore(store_dir)
    assert store.complete and store.shards == ["shard_00000", "shard_00001", "shard_00002"]
    assert store.reward_names == ["shapes_saturation", "shapes_geneval"]
    groups = list(store.groups())
    assert [g.index for g in groups] == [0, 1, 2, 3, 4]
    for g in groups:
        assert g.latents.shape == (3, 4, 8, 8) and g.latents.dtype == torch.float32
        assert g.images.shape == (3, 3, 16, 16) and g.images.dtype == torch.uint8
        assert set(g.rewards) == {"shapes_saturation", "shapes_geneval"}
        assert all(v.shape == (3,) for v in g.rewards.values())
        assert torch.isfinite(g.rewards["shapes_saturation"]).all()
        assert "shapes_geneval.strict" in g.extras
        assert len(set(g.seeds)) == 3 and g.meta["prompt"] == g.prompt
    # every sample's image is its latent decoded; its saturation is the stored reward
    from align.runtime import load_flow_model
    from rewards import build_reward

    model = load_flow_model("toy:test")
    g = groups[1]
    with torch.no_grad():
        decoded = model.decode(g.latents)
    assert (decoded * 255).round().to(torch.uint8).sub(g.images).abs().max() <= 1
    torch.testing.assert_close(build_reward("shapes_saturation")(decoded, [g.prompt] * 3).scores,
                               g.rewards["shapes_saturation"], atol=2e-3, rtol=0)
    manifest = json.loads((store_dir / MANIFEST).read_text())
    assert manifest["config"]["group_size"] == 3 and manifest["sampling"]["num_steps"] == 2
    assert set(manifest["shards"]["shard_00002"]["sha256"]) == {".safetensors", ".json"}
    assert not list(store_dir.glob(".*"))  # no temporary files left


def test_ode_samples_are_deterministic_and_an_existing_store_is_kept(store_dir, tmp_path):
    # a second store of the same config holds the same samples (each group is a pure function of
    # the config), and running the config on a finished store regenerates nothing
    other = tmp_path / "again"
    build_store(tiny_config(other, "num_groups=2", "groups_per_shard=1"))
    for a, b in zip(RolloutStore(other).groups(), RolloutStore(store_dir).groups()):
        assert a.seeds == b.seeds and a.prompt == b.prompt
        torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=0)
    copy = _copy(store_dir, tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in copy.iterdir()}
    build_store(tiny_config(copy))
    assert {p.name: p.stat().st_mtime_ns for p in copy.iterdir()} == stamps


def test_a_changed_config_does_not_resume_into_the_store(store_dir, tmp_path):
    copy = _copy(store_dir, tmp_path)
    with pytest.raises(ValueError, match="group_size.*--overwrite"):
        build_store(tiny_config(copy, "group_size=4"))
    (copy / "notes.txt").write_text("from the old store")
    store = build_store(tiny_config(copy, "group_size=4", "overwrite=true"))  # deleted, then generated anew
    assert store.manifest["group_size"] == 4 and not (copy / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


@pytest.mark.parametrize("damage", ["truncate", "flip_json", "delete"])
def test_corrupt_shard_is_named_and_the_others_stay_usable(store_dir, tmp_path, damage):
    copy = _copy(store_dir, tmp_path)
    target = copy / ("shard_00001.json" if damage == "flip_json" else "shard_00001.safetensors")
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip_json":
        target.write_bytes(data.replace(b'"group": 2', b'"group": 7'))
    else:
        target.unlink()
    store = RolloutStore(copy)
    with pytest.raises(CorruptShardError, match=str(target)):
        store.read_shard("shard_00001")
    with pytest.raises(CorruptShardError, match="shard_00001"):
        list(store.groups())
    with pytest.warns(UserWarning, match="shard_00001"):
        kept = [g.index for g in store.groups(skip_corrupt=True)]
    assert kept == [0, 1, 4]
    assert list(store.read_shard("shard_00002"))[0].index == 4
    assert set(store.verify()) == {"shard_00001"}
    # running the config again regenerates exactly the damaged shard
    with pytest.warns(UserWarning, match="regenerating"):
        build_store(tiny_config(copy))
    repaired = RolloutStore(copy)
    assert repaired.verify() == {} and [g.index for g in repaired.groups()] == [0, 1, 2, 3, 4]
    assert target.read_bytes() == data  # bit-identical to what was lost


def test_not_a_store_and_cli_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="not a rollout store"):
        RolloutStore(tmp_path)
    assert main(["train", str(REPO / "configs" / "shapes" / "gdro.yaml"), f"store={tmp_path}"]) == 2
    assert "not a rollout store" in capsys.readouterr().err


def test_cli_rollout_builds_a_store(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["rollout", str(YAML), *TINY, "num_groups=2", f"output_dir={out}"]) == 0
    assert RolloutStore(out).complete
    assert "rollout store" in capsys.readouterr().out


def test_sigkill_mid_run_then_resume_keeps_finished_shards(store_dir, tmp_path):
    """A real `align rollout` process is killed with SIGKILL after some shards; running it again
    keeps those shards' files untouched and completes the store to what an uninterrupted run
    writes."""
    out = tmp_path / "killed"
    overrides = [*TINY, "num_groups=40", "groups_per_shard=1", f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "align", "rollout", str(YAML), *overrides], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while len(_finished(out)) < 2:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    done = _finished(out)
    assert len(done) < 40, "the kill came too late to test anything"
    stamps = {name: (out / f"{name}.safetensors").stat().st_mtime_ns for name in done}

    store = build_store(load_config(RolloutConfig, YAML, overrides))
    assert store.complete and store.verify() == {}
    assert {name: (out / f"{name}.safetensors").stat().st_mtime_ns for name in done} == stamps
    groups = list(store.groups())
    assert [g.index for g in groups] == list(range(40))
    # the first groups equal those of the uninterrupted fixture store (same seed, same prompts)
    for a, b in zip(groups, RolloutStore(store_dir).groups()):
        assert (a.index, a.prompt, a.seeds) == (b.index, b.prompt, b.seeds)
        torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.rewards["shapes_saturation"], b.rewards["shapes_saturation"], atol=1e-4,
                                   rtol=0)


def _finished(root: Path) -> list[str]:
    try:
        return list(json.loads((root / MANIFEST).read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet (never half-written: os.replace)
        return []
