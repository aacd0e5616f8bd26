"""Prompts for online RL: where they come from, K repeats per prompt, and which rank gets which.

One epoch of GRPO-style training samples `num_groups` prompts and generates `group_size` (K)
samples for each: a global batch of N = num_groups * K samples, sample s in group s // K.
Every rank takes a contiguous 1/P of that batch (`PromptDataset.epoch_batch`), so when
num_groups is a multiple of P each rank holds whole groups; otherwise (or with
`spread_groups`) groups span ranks. Either way each sample carries its *global* group id,
which is what `align.advantages.distributed_group_advantages` needs: rewards are gathered
before the group statistics are computed, so a group split across ranks is normalised on
its complete data.

Everything is a pure function of (seed, epoch): which prompts an epoch uses, the order of the
samples and the seeds of their noise (`derive_seed`). A resumed run therefore replays the
same epochs without storing any sampler state, and a 1-process and a P-process run see the
same data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .config import doc

__all__ = ["PromptConfig", "PromptDataset", "SampleBatch", "derive_seed", "load_prompt_items", "shard_range"]


@dataclass
class PromptConfig:
    """Where training and held-out prompts come from."""

    split: str = doc("train", "ShapesWorld split for training prompts ('train' or 'test'); ignored if `file` is set.")
    file: str | None = doc(None, "Prompt file for training (.txt one per line, or .jsonl with 'prompt'/'caption').")
    eval_split: str = doc("test", "ShapesWorld split of the held-out prompts; ignored if `eval_file` is set.")
    eval_file: str | None = doc(None, "Prompt file of the held-out prompts (same formats as `file`).")
    eval_per_tag: int | None = doc(64, "Balanced held-out set: this many prompts per ShapesWorld category "
                                       "(cycled within it; null: the split as is). Ignored with `eval_file`.")
    eval_num_prompts: int | None = doc(None, "Evaluate on the first N held-out prompts (null: all of them).")
    eval_samples_per_prompt: int = doc(1, "Samples per held-out prompt (fixed seeds, so evaluations compare).")
    spread_groups: bool = doc(False, "Shuffle the samples of an epoch before splitting them across ranks, so "
                                     "groups span ranks (Flow-GRPO's sampler); False keeps groups contiguous.")

    def __post_init__(self):
        for name in ("split", "eval_split"):
            if getattr(self, name) not in ("train", "test"):
                raise ValueError(f"{name} must be 'train' or 'test', got {getattr(self, name)!r}")
        if self.eval_per_tag is not None and self.eval_per_tag < 1:
            raise ValueError("eval_per_tag must be >= 1 (or null for the split as is)")
        if self.eval_num_prompts is not None and self.eval_num_prompts < 1:
            raise ValueError("eval_num_prompts must be >= 1 (or null for all)")
        if self.eval_samples_per_prompt < 1:
            raise ValueError("eval_samples_per_prompt must be >= 1")


def load_prompt_items(split: str = "train", file: str | Path | None = None, per_tag: int | None = None) -> list[dict]:
    """Prompt dicts ({"prompt": str, "meta": GenEval dict (optional)}) from a file or a ShapesWorld
    split (`per_tag` items of every category if given)."""
    from .sample import read_prompt_file, shapesworld_prompts

    return read_prompt_file(file) if file else shapesworld_prompts(split, per_tag)


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys, e.g. derive_seed(seed, epoch, purpose, index)."""
    state = np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def shard_range(num_items: int, num_processes: int, process_index: int) -> tuple[int, int]:
    """[start, end) of rank `process_index`'s contiguous share; num_items must divide evenly
    (every rank must hold the same number of samples for the collective gathers)."""
    if num_items % num_processes:
        raise ValueError(f"{num_items} samples per epoch cannot be split evenly over {num_processes} processes; "
                         "choose groups_per_epoch * group_size divisible by the number of processes")
    per_rank = num_items // num_processes
    return process_index * per_rank, (process_index + 1) * per_rank


@dataclass
class SampleBatch:
    """This rank's share of one epoch's samples.

    items:      [n] prompt dicts ("prompt", optional "meta"), one per sample.
    group_ids:  [n] long, global group index within the epoch (same id on every rank).
    sample_ids: [n] long, global sample index within the epoch (in [0, num_samples)).
    """

    items: list[dict]
    group_ids: Tensor
    sample_ids: Tensor
    num_groups: int
    group_size: int

    @property
    def prompts(self) -> list[str]:
        return [item["prompt"] for item in self.items]

    @property
    def metadata(self) -> list[dict | None]:
        return [item.get("meta") for item in self.items]

    @property
    def num_samples(self) -> int:
        """Samples in the global batch (all ranks)."""
        return self.num_groups * self.group_size

    def __len__(self) -> int:
        return len(self.items)


class PromptDataset:
    """A fixed list of prompt dicts, served as K-repeated groups per epoch.

    Epoch e takes prompts [e G, (e + 1) G) of an endless sequence of seeded shuffles of the
    list (pass k shuffled with derive_seed(seed, k)), so every prompt is used equally often
    and no prompt repeats within an epoch while G <= len(items).
    """

    def __init__(self, items: Sequence[dict], seed: int = 0):
        if not items:
            raise ValueError("no prompts")
        self.items = list(items)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def _permutation(self, pass_index: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(derive_seed(self.seed, 0x50A55, pass_index)).shuffle(order)
        return order

    def epoch_prompts(self, epoch: int, num_groups: int) -> list[int]:
        """Indices into `items` of the `num_groups` prompts of epoch `epoch` (deterministic)."""
        n = len(self.items)
        start = epoch * num_groups
        chosen, position = [], start
        while len(chosen) < num_groups:
            pass_index, offset = divmod(position, n)
            take = min(num_groups - len(chosen), n - offset)
            chosen += self._permutation(pass_index)[offset : offset + take]
            position += take
        return chosen

    def epoch_batch(self, epoch: int, num_groups: int, group_size: int, num_processes: int = 1,
                    process_index: int = 0, spread_groups: bool = False) -> SampleBatch:
        """This rank's samples of epoch `epoch`: num_groups prompts x group_size repeats, split
        contiguously over `num_processes` ranks (after a seeded shuffle if spread_groups)."""
        prompt_index = self.epoch_prompts(epoch, num_groups)
        total = num_groups * group_size
        order = list(range(total))
        if spread_groups:
            random.Random(derive_seed(self.seed, 0x5B8EAD, epoch)).shuffle(order)
        start, end = shard_range(total, num_processes, process_index)
        sample_ids = order[start:end]
        group_ids = [s // group_size for s in sample_ids]
        return SampleBatch(items=[self.items[prompt_index[g]] for g in group_ids],
                           group_ids=torch.tensor(group_ids, dtype=torch.long),
                           sample_ids=torch.tensor(sample_ids, dtype=torch.long),
                           num_groups=num_groups, group_size=group_size)
