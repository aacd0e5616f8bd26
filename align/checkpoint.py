"""Atomic checkpoints of a training run: weights, optimizer, EMA, RNG states, counters.

Layout (one folder per saved epoch, epoch = the last completed epoch, 0-based):

    OUTPUT_DIR/checkpoints/epoch_000004/
        weights.safetensors   trainable parameters by name (LoRA or the whole transformer)
        state.pt              optimizer, EMA, RNG states of every rank, anything else (torch.save)
        trainer_state.json    {"epoch", "global_step", ...} for humans and `latest_checkpoint`
        ...                   whatever the `export` callback writes (e.g. a diffusers LoRA)

A checkpoint is written into a hidden temporary folder beside its final place and renamed
into place with `os.replace`, so a crash mid-write never leaves a half checkpoint under a
valid name; `latest_checkpoint` ignores hidden folders. `state.pt` holds only tensors and
plain Python values and is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from .metrics import METRICS_CSV, read_metrics_csv

__all__ = [
    "CHECKPOINTS",
    "checkpoint_dir",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "RunExistsError",
    "existing_run",
    "prepare_output_dir",
    "clear_output_dir",
    "rng_state",
    "set_rng_state",
]

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^epoch_(\d+)$")


def checkpoint_dir(output_dir: str | Path, epoch: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"epoch_{epoch:06d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (epoch, path), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under OUTPUT_DIR/checkpoints, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------- starting a run


class RunExistsError(ValueError):
    """A fresh start was asked for in a folder that holds a previous run."""


def existing_run(output_dir: str | Path) -> str | None:
    """What of a previous training run OUTPUT_DIR holds ("checkpoints up to epoch 4, metrics.csv
    up to epoch 5"), or None if it holds no checkpoint and no metrics row."""
    output_dir = Path(output_dir)
    found = []
    checkpoints = list_checkpoints(output_dir)
    if checkpoints:
        found.append(f"checkpoints up to epoch {checkpoints[-1][0]}")
    rows = read_metrics_csv(output_dir / METRICS_CSV)
    if rows:
        found.append(f"{METRICS_CSV} up to epoch {max(row.get('epoch', 0) for row in rows)}")
    return ", ".join(found) or None


def prepare_output_dir(output_dir: str | Path, resume: bool = False, overwrite: bool = False,
                       is_main: bool = True) -> Path | None:
    """The one rule for where a training run starts; returns the checkpoint to resume from or None.

    resume: continue from the newest checkpoint (a fresh start if there is none).
    overwrite: delete a previous run in OUTPUT_DIR first (`clear_output_dir`, main process only).
    Neither: a fresh start, refused with RunExistsError if OUTPUT_DIR already holds checkpoints or
    metrics, so re-running a command never silently replaces a run's results. Every process
    calls it (the check only reads), so all ranks agree on whether the run starts.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: --resume continues the run in output_dir, "
                         "--overwrite deletes it")
    if resume:
        return latest_checkpoint(output_dir)
    previous = existing_run(output_dir)
    if previous is None:
        return None
    if not overwrite:
        raise RunExistsError(f"{output_dir} already holds a run ({previous}); pass --resume to continue it, "
                             "--overwrite to delete it and start again, or choose another output_dir=...")
    if is_main:
        clear_output_dir(output_dir)
    return None


def clear_output_dir(output_dir: str | Path) -> None:
    """Delete OUTPUT_DIR: it is first renamed to a hidden sibling (one atomic step, so the old run
    is either all there or gone from OUTPUT_DIR), then removed. Refuses the working directory, a
    folder above it, the home folder and the filesystem root."""
    path = Path(output_dir)
    if not path.exists():
        return
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve() or resolved.parent == resolved:
        raise ValueError(f"refusing to delete {output_dir} (the working directory, a folder above it, home or /); "
                         "choose a run folder as output_dir")
    aside = path.parent / f".{path.name}.deleting-{os.getpid()}"
    os.replace(path, aside)
    shutil.rmtree(aside)


def replace_dir(src: Path, dst: Path) -> None:
    """Moves the finished folder `src` to `dst`; an existing `dst` is moved aside first and
    removed only after the swap, so at every moment a complete folder is in place."""
    if dst.exists():
        old = dst.parent / f".old-{dst.name}-{os.getpid()}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def save_checkpoint(output_dir: str | Path, epoch: int, weights: dict[str, Tensor], state: dict[str, Any],
                    info: dict[str, Any] | None = None, export: Callable[[Path], None] | None = None,
                    keep_last: int | None = None) -> Path:
    """Atomically write the checkpoint of `epoch` and return its folder.

    weights: name -> tensor (saved as safetensors, contiguous CPU copies); state: picklable-free
    nested dicts/lists of tensors and plain values (optimizer.state_dict(), EMA, rng_state()...);
    info: small JSON-able values (epoch and global_step belong here) for trainer_state.json;
    export(tmp_folder): optional extra files; keep_last: delete all but the newest N checkpoints.
    An existing checkpoint of the same epoch is replaced.
    """
    from safetensors.torch import save_file

    final = checkpoint_dir(output_dir, epoch)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        torch.save(state, tmp / "state.pt")
        if export is not None:
            export(tmp)
        meta = {"epoch": epoch, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(info or {})}
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_tree(tmp)
        replace_dir(tmp, final)  # same epoch saved before (e.g. at exit) is swapped out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None and keep_last > 0:
        for _, path in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """(weights, state, info) of a checkpoint folder written by `save_checkpoint`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"not a checkpoint folder (no trainer_state.json): {path}")
    weights = load_file(str(path / "weights.safetensors"))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    info = json.loads((path / "trainer_state.json").read_text())
    return weights, state, info


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain values (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
