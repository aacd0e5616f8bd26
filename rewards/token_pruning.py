"""Spatiotemporal token pruning for VLM video input (ExeVRM, "Video-Based Reward Modeling for CUAs").

Screen recordings are mostly flat background and frames that do not change, so most visual
tokens carry nothing. Two masks decide which tokens reach the language model:

- STP (spatial): per frame, adjacent patches whose normalised pixel vectors are within L2
  distance ``spatial_threshold`` (3.0) are linked; connected components (union-find) larger
  than ``min_component_tokens`` tokens (10 tokens = 40 patches at merge 2) are homogeneous
  background and removed. A token is kept if ANY of its merged patches is kept.
- TTP (temporal): per spatial position, a token whose cosine similarity to the last KEPT
  token at that position exceeds ``temporal_threshold`` (0.9999) is dropped; the first
  temporal slice is always kept.
- keep = STP AND TTP.

Pure functions work on patch grids ``[T, H, W, D]`` (T frames or temporal patches, H x W
patches of D normalised pixel values); :func:`qwen_video_patches` cuts a Qwen2-VL / Qwen2.5-VL
/ Qwen3-VL processor's ``pixel_values_videos`` into such grids (temporal patch size 2: one
grid slice per frame pair) and :func:`image_patches` does it for LLaVA-style ``pixel_values``
(frames given as images).

Applying a mask: :func:`prune_visual_tokens` is a context manager that hooks the model's
language model. The model runs unchanged up to it (placeholder scatter, M-RoPE position ids
from ``get_rope_index`` over the FULL sequence, Qwen3-VL deepstack features), and the hook then
drops the pruned positions from ``inputs_embeds``, ``attention_mask``, ``position_ids`` (and
``visual_pos_masks`` / ``deepstack_visual_embeds``) together, so kept tokens keep the rotary
positions they had before removal. Rows are re-packed left-aligned (right padding).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "PruningConfig",
    "union_find_components",
    "stp_keep",
    "ttp_keep",
    "combine_masks",
    "qwen_video_patches",
    "image_patches",
    "video_token_keep",
    "sequence_keep_mask",
    "prune_visual_tokens",
    "PruneRecord",
]


@dataclass
class PruningConfig:
    """Which pruning to apply and its thresholds (defaults: the ExeVRM paper's).

    spatial / temporal:   switch STP / TTP on or off.
    spatial_threshold:    L2 distance below which adjacent patches are linked (normalised pixels).
    min_component_tokens: components with MORE than this many tokens' worth of patches
                          (tokens x merge^2) are removed.
    temporal_threshold:   cosine similarity above which a token repeats the last kept one.
    """

    spatial: bool = True
    temporal: bool = True
    spatial_threshold: float = 3.0
    min_component_tokens: int = 10
    temporal_threshold: float = 0.9999

    def __post_init__(self):
        if self.spatial_threshold < 0 or self.min_component_tokens < 0:
            raise ValueError("PruningConfig: spatial_threshold and min_component_tokens must be >= 0")
        if not -1 <= self.temporal_threshold <= 1:
            raise ValueError(f"PruningConfig: temporal_threshold is a cosine, got {self.temporal_threshold}")

    @classmethod
    def build(cls, spec: "PruningConfig | dict | bool | None") -> "PruningConfig | None":
        """None / False -> no pruning; True -> defaults; a dict -> fields; a PruningConfig as is."""
        if spec is None or spec is False:
            return None
        if spec is True:
            return cls()
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, dict):
            return cls(**spec)
        raise TypeError(f"pruning must be a bool, dict or PruningConfig, got {type(spec).__name__}")


# ----------------------------------------------------------------------------- masks


def union_find_components(num_nodes: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root label [num_nodes] of each node's connected component, edges ``a[i] -- b[i]``.

    Vectorised union-find: every round hooks the larger root of each edge under the smaller
    one, then compresses paths by pointer jumping until every node points at its root.
    """
    parent = np.arange(num_nodes)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    while a.size:
        root_a, root_b = parent[a], parent[b]
        differ = root_a != root_b
        if not differ.any():
            break
        low, high = np.minimum(root_a, root_b)[differ], np.maximum(root_a, root_b)[differ]
        np.minimum.at(parent, high, low)  # union: roots only, towards smaller ids (no cycles)
        while True:  # find, with full path compression
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


def _merge_any(keep: np.ndarray, merge: int) -> np.ndarray:
    """[T, H, W] patch mask -> [T, H/m, W/m] token mask: a token is kept if any patch is."""
    t, h, w = keep.shape
    return keep.reshape(t, h // merge, merge, w // merge, merge).any(axis=(2, 4))


def stp_keep(patches: np.ndarray | Tensor, merge: int = 2, threshold: float = 3.0,
             min_component_tokens: int = 10) -> np.ndarray:
    """Spatial token pruning. patches [T, H, W, D] -> token keep mask [T, H/merge, W/merge].

    Per slice t, 4-adjacent patches with ||p - q||_2 < threshold are linked; components with
    more than ``min_component_tokens * merge**2`` patches are removed (patch mask False).
    """
    patches = torch.as_tensor(patches).float()
    t, h, w, _ = patches.shape
    ids = np.arange(t * h * w).reshape(t, h, w)
    near_right = ((patches[:, :, 1:] - patches[:, :, :-1]).norm(dim=-1) < threshold).numpy()  # [T, H, W-1]
    near_down = ((patches[:, 1:] - patches[:, :-1]).norm(dim=-1) < threshold).numpy()  # [T, H-1, W]
    a = np.concatenate([ids[:, :, :-1][near_right], ids[:, :-1][near_down]])
    b = np.concatenate([ids[:, :, 1:][near_right], ids[:, 1:][near_down]])
    roots = union_find_components(t * h * w, a, b)
    sizes = np.bincount(roots, minlength=t * h * w)[roots].reshape(t, h, w)
    return _merge_any(sizes <= min_component_tokens * merge * merge, merge)


def _tokens(patches: Tensor, merge: int) -> Tensor:
    """[T, H, W, D] patches -> [T, H/m, W/m, m*m*D] merged-token vectors."""
    t, h, w, d = patches.shape
    grid = patches.reshape(t, h // merge, merge, w // merge, merge, d).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(t, h // merge, w // merge, merge * merge * d)


def ttp_keep(patches: np.ndarray | Tensor, merge: int = 2, threshold: float = 0.9999) -> np.ndarray:
    """Temporal token pruning. patches [T, H, W, D] -> token keep mask [T, H/merge, W/merge].

    A token is dropped when cos(token, last kept token at the same position) > threshold;
    slice 0 is always kept.
    """
    tokens = torch.nn.functional.normalize(_tokens(torch.as_tensor(patches).double(), merge), dim=-1)
    keep = torch.ones(tokens.shape[:3], dtype=torch.bool)  # [T, h, w]
    last = tokens[0].clone()  # [h, w, D] last kept token per position
    for step in range(1, tokens.shape[0]):
        similar = (tokens[step] * last).sum(-1) > threshold  # [h, w]
        keep[step] = ~similar
        last[~similar] = tokens[step][~similar]
    return keep.numpy()


def combine_masks(*masks: np.ndarray | None) -> np.ndarray:
    """Logical AND of the given masks (None entries are skipped)."""
    masks = [m for m in masks if m is not None]
    if not masks:
        raise ValueError("combine_masks: no masks given")
    out = masks[0].copy()
    for mask in masks[1:]:
        out &= mask
    return out


# ----------------------------------------------------------------------------- patch grids


def qwen_video_patches(pixel_values_videos: Tensor, video_grid_thw: Tensor, merge: int = 2) -> list[Tensor]:
    """Qwen-VL processor output -> one patch grid [T, H, W, D] per video (row of the grid).

    The processor flattens each video's patches in (t, h/m, w/m, m, m) order; D = C x
    temporal_patch x patch x patch normalised pixel values.
    """
    grids, start = [], 0
    for t, h, w in video_grid_thw.tolist():
        count = t * h * w
        flat = pixel_values_videos[start:start + count].float()
        d = flat.shape[-1]
        grid = flat.reshape(t, h // merge, w // merge, merge, merge, d).permute(0, 1, 3, 2, 4, 5)
        grids.append(grid.reshape(t, h, w, d))
        start += count
    if start != pixel_values_videos.shape[0]:
        raise ValueError(f"video_grid_thw covers {start} patches, pixel_values_videos has "
                         f"{pixel_values_videos.shape[0]}")
    return grids


def image_patches(pixel_values: Tensor, patch_size: int) -> Tensor:
    """[T, C, H, W] frames (LLaVA-style ``pixel_values``, one image per frame) -> [T, H/p, W/p, C*p*p]."""
    t, c, h, w = pixel_values.shape
    grid = pixel_values.float().reshape(t, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(t, h // patch_size, w // patch_size, c * patch_size ** 2)


def video_token_keep(grid: Tensor | np.ndarray, config: PruningConfig | None, merge: int = 2) -> np.ndarray:
    """Token keep mask [T, H/m, W/m] of one video's patch grid [T, H, W, D] under ``config``."""
    t, h, w = grid.shape[:3]
    if config is None:
        return np.ones((t, h // merge, w // merge), dtype=bool)
    spatial = (stp_keep(grid, merge, config.spatial_threshold, config.min_component_tokens)
               if config.spatial else None)
    temporal = ttp_keep(grid, merge, config.temporal_threshold) if config.temporal else None
    if spatial is None and temporal is None:
        return np.ones((t, h // merge, w // merge), dtype=bool)
    return combine_masks(spatial, temporal)


def sequence_keep_mask(input_ids: Tensor, visual_token_id: int, visual_keep: Sequence[np.ndarray | Tensor]) -> Tensor:
    """[B, L] keep mask: True everywhere except pruned visual tokens.

    ``visual_keep`` holds one flattened mask per visual input (video), in the order its tokens
    appear in the batch (row-major over [B, L]), as in the processor's output.
    """
    flat = torch.cat([torch.as_tensor(np.asarray(m)).reshape(-1).bool() for m in visual_keep]) if visual_keep \
        else torch.zeros(0, dtype=torch.bool)
    is_visual = input_ids == visual_token_id
    if int(is_visual.sum()) != flat.numel():
        raise ValueError(f"{int(is_visual.sum())} visual tokens in input_ids but masks for {flat.numel()}")
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    keep[is_visual] = flat.to(keep.device)
    return keep


# ----------------------------------------------------------------------------- applying


@dataclass
class PruneRecord:
    """What the last pruned forward did (filled by :func:`prune_visual_tokens`).

    index:        [B, L'] source position of each kept slot (padding slots point at 0).
    valid:        [B, L'] True on real (kept) slots.
    position_ids: the compacted position ids handed to the language model.
    """

    index: Tensor | None = None
    valid: Tensor | None = None
    position_ids: Tensor | None = None
    calls: int = 0
    extra: dict = field(default_factory=dict)

    def last_positions(self) -> Tensor:
        """[B] index (in the pruned sequence) of each row's last real token."""
        return self.valid.long().cumsum(1).argmax(1)


def language_model_of(model: Any) -> torch.nn.Module:
    """The decoder a VLM feeds its merged embeddings into (Qwen-VL, LLaVA: ``model.model.language_model``)."""
    inner = getattr(model, "model", model)
    for owner in (inner, model):
        if isinstance(getattr(owner, "language_model", None), torch.nn.Module):
            return owner.language_model
    raise TypeError(f"token pruning: cannot find the language model of {type(model).__name__}")


def _gather(value: Tensor, index: Tensor, dim: int) -> Tensor:
    """value gathered along ``dim`` (the sequence dim) with index [B, L'] (batch dim = dim - 1)."""
    shape = [1] * value.ndim
    shape[dim - 1], shape[dim] = index.shape
    expanded = index.reshape(shape).expand(*value.shape[:dim], index.shape[1], *value.shape[dim + 1:])
    return value.gather(dim, expanded)


@contextlib.contextmanager
def prune_visual_tokens(model: Any, keep: Tensor | None) -> Iterator[PruneRecord]:
    """Inside the block, forwards of ``model`` drop the positions where ``keep`` [B, L] is False.

    Everything before the language model runs on the full sequence (so M-RoPE position ids are
    those of the unpruned input); the hook removes the pruned slots from inputs_embeds,
    attention_mask, position_ids ([B, L], [3, B, L] or [4, B, L]), visual_pos_masks and the
    deepstack features, and packs rows left-aligned. Logits come back for the pruned sequence:
    use the yielded record's ``last_positions()`` / ``index`` to find tokens. keep=None: no-op.
    Only for full-sequence forwards (no KV cache / generation).
    """
    record = PruneRecord()
    if keep is None:
        yield record
        return

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or args:
            raise RuntimeError("token pruning: the language model was not called with inputs_embeds=")
        if kwargs.get("past_key_values") is not None and kwargs["past_key_values"].get_seq_length() > 0:
            raise RuntimeError("token pruning supports full forwards only, not cached generation")
        batch, length = embeds.shape[:2]
        if tuple(keep.shape) != (batch, length):
            raise ValueError(f"token pruning: keep mask {tuple(keep.shape)} != sequence {(batch, length)}")
        mask = kwargs.get("attention_mask")
        mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device) if mask is None else mask
        if mask.ndim != 2:
            raise RuntimeError("token pruning needs a 2-D attention_mask")
        positions = kwargs.get("position_ids")
        if positions is None:  # text-only decoders: the default arange, computed before removal
            positions = torch.arange(length, device=embeds.device).expand(batch, length)
        kept = keep.to(embeds.device) & mask.bool()  # padding is dropped too, then re-added at the end
        counts = kept.sum(1)  # [B]
        width = int(counts.max())
        order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :width]  # kept first, in order
        valid = torch.arange(width, device=embeds.device)[None] < counts[:, None]  # [B, L']
        index = torch.where(valid, order, torch.zeros_like(order))
        kwargs["inputs_embeds"] = _gather(embeds, index, 1)
        kwargs["attention_mask"] = valid.to(mask.dtype)
        kwargs["position_ids"] = _gather(positions, index, positions.ndim - 1)
        kwargs.pop("cache_position", None)
        if kwargs.get("visual_pos_masks") is not None:  # Qwen3-VL deepstack
            visual = kwargs["visual_pos_masks"]
            kept_visual = kept[visual]  # which visual tokens survive, row-major like the features
            kwargs["deepstack_visual_embeds"] = [f[kept_visual.to(f.device)] for f in kwargs["deepstack_visual_embeds"]]
            kwargs["visual_pos_masks"] = _gather(visual, index, 1) & valid
        record.index, record.valid, record.position_ids = index, valid, kwargs["position_ids"]
        record.calls += 1
        return args, kwargs

    handle = language_model_of(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()
