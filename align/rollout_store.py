"""A durable on-disk store of scored reference rollouts: what offline methods (GDRO) train on.

    align rollout configs/shapes/rollout.yaml [key=value ...]     # build, or finish after a kill

K samples per prompt (a group) are drawn from the reference model (the deterministic ODE
sampler by default), decoded, scored by every configured reward, and written shard by shard:

    STORE/manifest.json            generating config, resolved sampler settings, reward specs,
                                   and per finished shard its group range and file sha256s
    STORE/shard_00000.safetensors  latents [n K, *latent] float32 (+ images [n K, 3, H, W] uint8)
    STORE/shard_00000.json         per group: prompt, metadata, seeds, rewards, reward extras

Durability: every file is written to a temporary name, fsynced and renamed into place, and a
shard counts as finished only once the manifest (rewritten the same way) lists it, so a kill
at any moment leaves the finished shards intact; running the command again skips them (and
regenerates a listed shard whose files are missing or fail their checksum). Every group is a
pure function of (config, group index): its prompt, and sample j's initial noise seeded with
derive_seed(seed, group, j), so a resumed store is the store an uninterrupted run writes.

Reading: `RolloutStore(path).groups()` yields whole groups (`RolloutGroup`). A truncated or
corrupt shard raises `CorruptShardError` naming its file; the other shards stay readable
(`groups(skip_corrupt=True)` warns and skips it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from samplers.steps import STEPS

from .checkpoint import clear_output_dir
from .config import config_to_dict, doc, register_config
from .data import PromptDataset, derive_seed, load_prompt_items

__all__ = ["RolloutConfig", "RolloutGroup", "RolloutStore", "CorruptShardError", "build_store", "store_summary",
           "MANIFEST"]

FORMAT, VERSION = "genalign-rollout-store", 1
MANIFEST = "manifest.json"
# config keys that may change between a run and its resumption (they do not change the samples)
NOT_GENERATING = ("output_dir", "quiet", "device", "overwrite")
_NOISE, _STEP_NOISE = 1, 2  # derive_seed purposes


@register_config("rollout")
@dataclass
class RolloutConfig:
    """What `align rollout` samples, how it scores it and where the store goes."""

    model: str = doc("shapesworld", "Reference model: 'shapesworld', 'toy:test', a diffusers folder or a hub id.")
    lora: str | None = doc(None, "Optional LoRA (folder or .safetensors) loaded into the reference.")
    rewards: list[str | dict] = doc(["shapes_geneval", "shapes_quality"],
                                    "Reward specs (rewards.build_reward); every sample gets every score. Trainers "
                                    "pick the one they rank by (GDRO's rank_by; default the first).")
    split: str = doc("train", "ShapesWorld split of the prompts ('train' or 'test'); ignored with `prompt_file`.")
    prompt_file: str | None = doc(None, "Prompt file (.txt one per line, or GenEval-style .jsonl).")
    num_groups: int | None = doc(None, "Groups to generate; prompts are drawn in seeded shuffled passes over "
                                       "the list (null: one group per prompt).")
    group_size: int = doc(6, "Samples per prompt K (GDRO: 6; 2 is unstable).")
    sampler: str = doc("ode", f"Step function: {', '.join(STEPS)} (GDRO: the reference's deterministic ODE).")
    step_params: dict = doc({}, "Parameters of a stochastic sampler, e.g. {noise_level: 0.7}.")
    num_steps: int | None = doc(None, "Denoising steps (null: the model's default, 10 for ShapesWorld).")
    guidance: float | None = doc(None, "CFG scale (null: the model's default, 4.5 for ShapesWorld).")
    shift: float | None = doc(None, "Timestep shift of the sigma schedule (null: the model's default).")
    negative_prompt: str = doc("", "Negative prompt of CFG.")
    resolution: int | None = doc(None, "Square image side in px (null: the model's native size).")
    batch_size: int = doc(48, "Samples per forward batch (batches never cross a shard).")
    groups_per_shard: int = doc(16, "Groups per shard: the unit of atomic writes and of work lost to a kill.")
    save_images: bool = doc(True, "Also store the decoded images as uint8 (for inspection and re-scoring).")
    seed: int = doc(0, "Seed of the prompt order and every sample's noise.")
    output_dir: str = doc("runs/shapes/rollouts", "The store folder. A store of the same settings is resumed "
                                                  "(exact: finished shards are kept, none is rewritten); one of "
                                                  "other settings is refused unless overwrite.")
    overwrite: bool = doc(False, "Delete the store in output_dir first and generate it again.")
    device: str = doc("auto", "torch device ('auto': cuda if available, else cpu).")
    dtype: str = doc("fp32", "Model weights dtype: fp32, bf16 or fp16 (half precision needs CUDA).")
    quiet: bool = doc(False, "No per-shard progress lines.")

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (a group ranks its samples)")
        if self.sampler not in STEPS:
            raise ValueError(f"sampler must be one of {tuple(STEPS)}, got {self.sampler!r}")
        if self.split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {self.split!r}")
        for name in ("batch_size", "groups_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.num_groups is not None and self.num_groups < 1:
            raise ValueError("num_groups must be >= 1 (or null: one group per prompt)")
        if not self.rewards:
            raise ValueError("rewards must name at least one reward")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be fp32, bf16 or fp16, got {self.dtype!r}")


class CorruptShardError(ValueError):
    """A shard's files are missing, truncated or do not match the manifest's checksums."""


@dataclass
class RolloutGroup:
    """One prompt's K samples. latents: [K, *latent] float32; images: [K, 3, H, W] uint8 or None;
    rewards: {name: [K] float32 (NaN = not scored)}; extras: {"reward.key": [K]}."""

    index: int
    prompt: str
    meta: dict | None
    seeds: list[int]
    latents: Tensor
    images: Tensor | None
    rewards: dict[str, Tensor]
    extras: dict[str, Tensor]


# ============================================================================= files


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_floats(values: Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]  # NaN is not JSON


def _tensor(values: list[float | None]) -> Tensor:
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)


def _mean(lists) -> float:
    """Mean of the non-null values of several JSON score lists (NaN if none)."""
    values = [v for values in lists for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}"


# ============================================================================= reading


class RolloutStore:
    """A store written by `build_store` (finished shards only, as the manifest lists them)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"not a rollout store (no {MANIFEST}): {self.root}; build it with `align rollout`")
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: malformed manifest ({err})") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(f"{path}: not a {FORMAT} v{VERSION} manifest")

    @property
    def group_size(self) -> int:
        return int(self.manifest["group_size"])

    @property
    def num_groups(self) -> int:
        """Groups the store is meant to hold (all of them once `complete`)."""
        return int(self.manifest["num_groups"])

    @property
    def reward_names(self) -> list[str]:
        return list(self.manifest["rewards"])

    @property
    def shards(self) -> list[str]:
        """Names of the finished shards, in group order."""
        return sorted(self.manifest["shards"])

    @property
    def complete(self) -> bool:
        return len(self.manifest["shards"]) == self.manifest["num_shards"]

    def _read_verified(self, name: str, suffix: str) -> bytes:
        path = self.root / f"{name}{suffix}"
        expected = self.manifest["shards"][name]["sha256"][suffix]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CorruptShardError(f"rollout shard file {path} is missing") from None
        if _sha256(data) != expected:
            raise CorruptShardError(f"rollout shard file {path} is corrupt or truncated ({len(data)} bytes, sha256 "
                                    f"does not match {MANIFEST}); run `align rollout` on the store's config again "
                                    "to regenerate it (the other shards are usable)")
        return data

    def read_shard(self, name: str) -> list[RolloutGroup]:
        """The groups of one finished shard, checksums verified (CorruptShardError otherwise)."""
        from safetensors.torch import load

        if name not in self.manifest["shards"]:
            raise KeyError(f"{self.root}: no finished shard {name!r}")
        tensors = load(self._read_verified(name, ".safetensors"))
        sidecar = json.loads(self._read_verified(name, ".json"))
        k = self.group_size
        groups = []
        for position, g in enumerate(sidecar["groups"]):
            rows = slice(position * k, (position + 1) * k)
            groups.append(RolloutGroup(
                index=g["group"], prompt=g["prompt"], meta=g["meta"], seeds=g["seeds"],
                latents=tensors["latents"][rows], images=tensors["images"][rows] if "images" in tensors else None,
                rewards={n: _tensor(v) for n, v in g["rewards"].items()},
                extras={n: _tensor(v) for n, v in g["extras"].items()}))
        return groups

    def groups(self, skip_corrupt: bool = False) -> Iterator[RolloutGroup]:
        """Every finished group, shard by shard. A corrupt shard raises CorruptShardError, or with
        `skip_corrupt` is skipped with a warning."""
        for name in self.shards:
            try:
                shard = self.read_shard(name)
            except CorruptShardError as err:
                if not skip_corrupt:
                    raise
                warnings.warn(f"skipping {err}", stacklevel=2)
                continue
            yield from shard

    def verify(self) -> dict[str, str]:
        """{shard name: error message} of every finished shard that fails its checksums."""
        bad = {}
        for name in self.shards:
            for suffix in (".safetensors", ".json"):
                try:
                    self._read_verified(name, suffix)
                except CorruptShardError as err:
                    bad[name] = str(err)
                    break
        return bad


# ============================================================================= writing


def _generating_config(cfg: RolloutConfig) -> dict:
    return {k: v for k, v in config_to_dict(cfg).items() if k not in NOT_GENERATING}


def _reward_names(specs: list[str | dict]) -> list[str]:
    """Unique labels of the reward specs (the spec's name, suffixed if repeated)."""
    names = []
    for spec in specs:
        base = spec if isinstance(spec, str) else str(spec.get("name", spec.get("type", "reward")))
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def _plan(cfg: RolloutConfig) -> list[dict]:
    """The prompt item of every group (a pure function of the config)."""
    items = load_prompt_items(cfg.split, cfg.prompt_file)
    num_groups = cfg.num_groups or len(items)
    return [items[i] for i in PromptDataset(items, seed=cfg.seed).epoch_prompts(0, num_groups)]


def _open_manifest(cfg: RolloutConfig, root: Path, num_groups: int, sampling: dict, latent_shape) -> dict:
    """The store's manifest: a fresh one, or the existing one if it was made by the same config."""
    fresh = {"format": FORMAT, "version": VERSION, "config": _generating_config(cfg), "sampling": sampling,
             "rewards": dict(zip(_reward_names(cfg.rewards), cfg.rewards)), "group_size": cfg.group_size,
             "num_groups": num_groups, "groups_per_shard": cfg.groups_per_shard,
             "num_shards": math.ceil(num_groups / cfg.groups_per_shard), "latent_shape": list(latent_shape),
             "shards": {}}
    if not (root / MANIFEST).is_file():
        return fresh
    existing = RolloutStore(root).manifest
    changed = sorted(k for k in set(fresh["config"]) | set(existing["config"])
                     if fresh["config"].get(k) != existing["config"].get(k))
    if changed or existing["sampling"] != sampling:
        what = ", ".join(changed) or "the model's sampler defaults"
        raise ValueError(f"{root} holds a rollout store generated with other settings ({what} differ); "
                         "pass --overwrite to delete it and generate it again, or choose another output_dir=...")
    return existing


@torch.no_grad()
def _generate_shard(model, rewards: dict, items: list[dict], first_group: int, cfg: RolloutConfig,
                    sigmas: Tensor, guidance: float) -> tuple[dict[str, Tensor], dict]:
    """Sample, decode and score groups first_group .. first_group + len(items) - 1."""
    from samplers.generate import sample_noise
    from samplers.rollout import rollout

    k = cfg.group_size
    samples = [(first_group + i // k, i % k, items[i // k]) for i in range(len(items) * k)]  # (group, j, item)
    seeds = [derive_seed(cfg.seed, _NOISE, g, j) for g, j, _ in samples]
    latents, images, scores, extras = [], [], {n: [] for n in rewards}, {}
    for start in range(0, len(samples), cfg.batch_size):
        batch = samples[start : start + cfg.batch_size]
        prompts, metas = [it["prompt"] for _, _, it in batch], [it.get("meta") for _, _, it in batch]
        cond = model.encode_prompt(prompts, negative_prompt=cfg.negative_prompt if guidance > 1 else None)
        noise = sample_noise(seeds[start : start + len(batch)], model.latent_shape(cfg.resolution, cfg.resolution),
                             model.device)
        generator = torch.Generator(device=model.device).manual_seed(derive_seed(cfg.seed, _STEP_NOISE, batch[0][0],
                                                                                 batch[0][1]))
        traj = rollout(model, cond, sigmas, step_types=cfg.sampler, step_params=cfg.step_params or None,
                       guidance=guidance, initial_noise=noise, generator=generator)
        decoded = model.decode(traj.final)
        group_ids = torch.tensor([g for g, _, _ in batch])
        for name, reward in rewards.items():
            out = reward(decoded, prompts, metadata=metas, group_ids=group_ids)
            scores[name].append(out.scores.float().cpu())
            for key, value in out.extras.items():
                if isinstance(value, Tensor) and value.ndim == 1 and value.shape[0] == len(batch):
                    extras.setdefault(f"{name}.{key}", []).append(value.float().cpu())
        latents.append(traj.final.float().cpu())
        images.append((decoded.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    tensors = {"latents": torch.cat(latents).contiguous()}
    if cfg.save_images:
        tensors["images"] = torch.cat(images).contiguous()
    scores = {n: torch.cat(v) for n, v in scores.items()}
    extras = {n: torch.cat(v) for n, v in extras.items() if sum(map(len, v)) == len(samples)}
    sidecar = {"groups": [{"group": first_group + i, "prompt": item["prompt"], "meta": item.get("meta"),
                           "seeds": seeds[i * k : (i + 1) * k],
                           "rewards": {n: _json_floats(v[i * k : (i + 1) * k]) for n, v in scores.items()},
                           "extras": {n: _json_floats(v[i * k : (i + 1) * k]) for n, v in extras.items()}}
                          for i, item in enumerate(items)]}
    return tensors, sidecar


def build_store(cfg: RolloutConfig, model=None) -> RolloutStore:
    """Generate the store of `cfg` (or finish it: finished, intact shards are kept). Returns it.

    model: a FlowModel adapter to sample from (default: load `cfg.model` and `cfg.lora`).
    """
    from safetensors.torch import save

    from rewards import build_reward
    from samplers.progress import track
    from samplers.schedules import flow_sigmas

    from .runtime import load_flow_model
    from .sample import resolve_dtype

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if model is None:
        model = load_flow_model(cfg.model, device).to(resolve_dtype(cfg.dtype, device))
        if cfg.lora:
            model.load_lora(cfg.lora)
    model.eval().requires_grad_(False)
    defaults = getattr(model, "defaults", {})
    sampling = {"num_steps": cfg.num_steps or defaults.get("num_steps", 28),
                "guidance": defaults.get("guidance", 1.0) if cfg.guidance is None else cfg.guidance,
                "shift": cfg.shift or defaults.get("shift", 3.0)}
    plan = _plan(cfg)
    root = Path(cfg.output_dir)
    if cfg.overwrite:
        clear_output_dir(root)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".*.tmp-*"):  # temporary files of a killed run
        leftover.unlink(missing_ok=True)
    manifest = _open_manifest(cfg, root, len(plan), sampling,
                              model.latent_shape(cfg.resolution, cfg.resolution))
    if manifest["shards"]:  # resuming: a listed shard that is damaged is made again
        for name, error in RolloutStore(root).verify().items():
            warnings.warn(f"regenerating {error.split(';')[0]}", stacklevel=2)
            del manifest["shards"][name]

    rewards = {name: build_reward(spec) for name, spec in manifest["rewards"].items()}
    sigmas = flow_sigmas(sampling["num_steps"], shift=sampling["shift"], device=model.device)
    todo = [i for i in range(manifest["num_shards"]) if _shard_name(i) not in manifest["shards"]]
    if not cfg.quiet and len(todo) < manifest["num_shards"]:
        print(f"{root}: {manifest['num_shards'] - len(todo)} of {manifest['num_shards']} shards already done")
    for index in track(todo, f"rollout store {root}", unit="shards", quiet=cfg.quiet):
        start_time = time.perf_counter()
        start_cpu = time.process_time()
        first = index * cfg.groups_per_shard
        items = plan[first : first + cfg.groups_per_shard]
        tensors, sidecar = _generate_shard(model, rewards, items, first, cfg, sigmas, sampling["guidance"])
        name = _shard_name(index)
        files = {".safetensors": save(tensors), ".json": (json.dumps(sidecar, indent=1) + "\n").encode()}
        for suffix, data in files.items():
            _atomic_write(root / f"{name}{suffix}", data)
        manifest["shards"][name] = {"groups": [first, first + len(items)],
                                    "sha256": {suffix: _sha256(data) for suffix, data in files.items()},
                                    "seconds": round(time.perf_counter() - start_time, 3),
                                    "cpu_seconds": round(time.process_time() - start_cpu, 3)}
        _atomic_write(root / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())  # the commit point
        if not cfg.quiet:
            means = " | ".join(f"{n} {_mean(g['rewards'][n] for g in sidecar['groups']):.3f}" for n in rewards)
            print(f"{name}: groups {first}-{first + len(items) - 1} | {means} | "
                  f"{manifest['shards'][name]['seconds']:.1f}s", flush=True)
    return RolloutStore(root)


def store_summary(store: RolloutStore) -> dict[str, Any]:
    """Per-reward means and the share of groups whose samples all score alike (no ranking signal)."""
    scores: dict[str, list[Tensor]] = {n: [] for n in store.reward_names}
    for group in store.groups(skip_corrupt=True):
        for name, values in group.rewards.items():
            scores[name].append(values)
    out: dict[str, Any] = {"groups": sum(len(v) for v in list(scores.values())[:1])}
    for name, values in scores.items():
        if values:
            stacked = torch.stack(values)  # [G, K]
            out[f"{name}_mean"] = float(torch.nanmean(stacked))
            out[f"{name}_tied_groups"] = float((stacked == stacked[:, :1]).all(1).float().mean())
    out["generation_seconds"] = sum(s.get("seconds", 0.0) for s in store.manifest["shards"].values())
    return out
