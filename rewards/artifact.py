"""The lightweight artefact reward: a frozen image backbone + a small MLP head trained with BCE.

"Understanding Reward Hacking in T2I RL" guards the task reward against reward hacking with an
artefact score, reward = 1 - P(artefact), summed with the task reward before group
normalisation. Its released judge is a prompted Qwen2.5-VL-7B; the paper also describes a
lightweight classifier trained on a small curated artefact/clean set. This module is that
classifier:

- "artifact_classifier" (:class:`ArtifactClassifierReward`): reward = 1 - sigmoid(head(
  backbone(image))). Raw range [0, 1], prompt-blind, differentiable when the backbone is (the
  ShapesWorld VAE encoder is: gradients reach the pixels). The head shipped in
  ``rewards/models/weights/artifact_head/`` works out of the box on ShapesWorld.
- :func:`train_artifact_head` (``align train-artifact``): builds clean/artefact data with
  ``eval.shapes.artifacts`` (clean = ShapesWorld renders and base-model samples; artefact =
  their corrupted copies: blotches, grid textures, colour noise, smears, ghosting), embeds
  it once with the frozen backbone, trains the head and reports held-out AUROC per
  artefact kind (held-out = test-split scenes, other sampling and corruption seeds).

Backbones (``backbone=``): ``"shapesworld_vae"`` (default; a multi-scale feature grid of the
shipped ShapesWorld ``AutoencoderKL`` encoder), ``"vae:PATH"`` (any diffusers AutoencoderKL
folder, or a model folder with a ``vae/`` subfolder), ``"torchvision:NAME[:WEIGHTS]"``,
``"open_clip:NAME[:PRETRAINED]"``, ``"hf:ID_OR_PATH"`` (a transformers vision model or CLIP),
or a model object. Only the ShapesWorld VAE path has a trained head; for real images train
one with ``align train-artifact --backbone ...`` on your own clean images.

Head files: ``head.safetensors`` (MLP weights + the feature standardisation) and
``config.json`` (backbone spec, sizes, training settings and held-out metrics). The head
classifies each cell of the backbone's feature grid (16x16 for the VAE) with one small MLP
and takes the log-sum-exp over cells: local artefacts (a blotch, a smear) count wherever
they are; a global embedding (CLIP, torchvision) is a grid of one cell.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewards.base import IMAGE, VIDEO, Reward, RewardOutput, cosine_lr, frames_as_images, progress_bar, register_reward

__all__ = [
    "SHIPPED_HEAD_DIR",
    "ArtifactClassifierReward",
    "ArtifactHead",
    "VAEFeatures",
    "PretrainedImageFeatures",
    "load_backbone",
    "load_head",
    "save_head",
    "auroc",
    "heldout_metrics",
    "train_artifact_head",
]

SHIPPED_HEAD_DIR = Path(__file__).parent / "models" / "weights" / "artifact_head"
WEIGHTS_FILE = "head.safetensors"
CONFIG_FILE = "config.json"
DEFAULT_BACKBONE = "shapesworld_vae"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- backbones


def _resize(images: Tensor, size: int | None) -> Tensor:
    """[N, 3, H, W] -> [N, 3, size, size] (bilinear, antialiased); unchanged if already that size."""
    if not size or tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _to_grid(feature_map: Tensor, grid: int) -> Tensor:
    """[N, C, h, w] -> [N, C', grid, grid]: maps finer than the grid are summarised per cell by
    their mean, max and min (C' = 3C; a small local artefact moves the extremes, not the mean)."""
    factor = feature_map.shape[-1] // grid
    if factor <= 1:
        return feature_map
    return torch.cat([F.avg_pool2d(feature_map, factor), F.max_pool2d(feature_map, factor),
                      -F.max_pool2d(-feature_map, factor)], dim=1)


class VAEFeatures(nn.Module):
    """Multi-scale features of a frozen diffusers ``AutoencoderKL`` encoder on a spatial grid.

    The activations after conv_in, each down block, the mid block and conv_out (the latent
    moments) are brought to the latent grid (16x16 for a 64 px image and a 4x VAE; finer maps
    are summarised per cell by mean / max / min) and concatenated:
    [N, 3, H, W] in [0, 1] -> [N, C, P] with P = grid cells. Fully convolutional and
    differentiable w.r.t. the pixels; the VAE's parameters stay frozen.
    """

    def __init__(self, vae: nn.Module, spec: str = "custom"):
        super().__init__()
        self.encoder = vae.encoder.eval().requires_grad_(False)
        self.spec = spec
        self.image_size = int(vae.config.sample_size)
        self.grid = self.image_size // 2 ** (len(vae.config.block_out_channels) - 1)

    def forward(self, images: Tensor) -> Tensor:
        enc = self.encoder
        images = _resize(images, self.image_size)  # the head saw this scale's statistics
        h = enc.conv_in(images.to(enc.conv_in.weight.dtype) * 2 - 1)
        maps = [h]
        for block in enc.down_blocks:
            h = block(h)
            maps.append(h)
        h = enc.mid_block(h)
        maps.append(h)
        maps.append(enc.conv_out(enc.conv_act(enc.conv_norm_out(h))))
        return torch.cat([_to_grid(m.float(), self.grid) for m in maps], dim=1).flatten(2)  # [N, C, P]


class PretrainedImageFeatures(nn.Module):
    """A frozen pretrained image model as a feature extractor: [N, 3, H, W] in [0, 1] -> [N, D, 1]
    (one global embedding, i.e. a grid of one cell).

    kind "clip": a ``rewards.clip.ClipEncoder`` (open_clip or transformers CLIP; unit-norm
    image embeddings, its own preprocessing). kind "torchvision": a classifier whose last layer
    is replaced by Identity. kind "transformers": a vision model called with ``pixel_values``;
    its ``pooler_output``, else the mean of ``last_hidden_state``. Non-CLIP inputs are resized
    (bilinear, antialiased) to ``image_size`` and normalised with ``mean`` / ``std``.
    """

    def __init__(self, model: Any, kind: str, spec: str = "custom", image_size: int | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        if kind not in ("clip", "torchvision", "transformers"):
            raise ValueError(f"unknown backbone kind {kind!r}")
        self.kind, self.spec, self.image_size = kind, spec, image_size
        if kind == "clip":
            self.clip = model  # a ClipEncoder (not a Module): its model is frozen already
        else:
            self.model = model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.embed(images).unsqueeze(-1)  # [N, D, 1]

    def embed(self, images: Tensor) -> Tensor:
        if self.kind == "clip":
            return self.clip.embed_images(images)
        images = _resize(images, self.image_size)
        pixels = (images.float() - self.mean.to(images.device)) / self.std.to(images.device)
        parameter = next(self.model.parameters())
        pixels = pixels.to(parameter.device, parameter.dtype)
        if self.kind == "torchvision":
            return self.model(pixels).flatten(1).float()
        output = self.model(pixel_values=pixels)
        pooled = getattr(output, "pooler_output", None)
        features = pooled if pooled is not None else output.last_hidden_state.mean(1)
        return features.flatten(1).float()


def _vae_from_path(path: str) -> nn.Module:
    from diffusers import AutoencoderKL

    root = Path(path)
    if root.is_dir() and not (root / "config.json").is_file() and (root / "vae").is_dir():
        return AutoencoderKL.from_pretrained(root / "vae")
    if root.is_dir():
        return AutoencoderKL.from_pretrained(root)
    return AutoencoderKL.from_pretrained(path, subfolder="vae")  # a hub model id


def _torchvision_backbone(spec: str, name: str, weights: str | None) -> PretrainedImageFeatures:
    import torchvision

    model = torchvision.models.get_model(name, weights=weights or "DEFAULT")
    for attribute in ("fc", "classifier", "heads", "head"):
        if isinstance(getattr(model, attribute, None), nn.Module):
            setattr(model, attribute, nn.Identity())
            break
    transforms = torchvision.models.get_model_weights(name)[weights or "DEFAULT"].transforms()
    image_size = int(getattr(transforms, "crop_size", [224])[0])
    return PretrainedImageFeatures(model, "torchvision", spec, image_size, IMAGENET_MEAN, IMAGENET_STD)


def _transformers_backbone(model: nn.Module, spec: str, processor_source: str | None = None) -> nn.Module:
    """A transformers model object: CLIP models go through ClipEncoder, others are vision models."""
    if hasattr(model, "get_image_features") and hasattr(model, "get_text_features"):
        from rewards.clip import ClipEncoder

        return PretrainedImageFeatures(ClipEncoder(model, processor=processor_source, device="cpu"), "clip", spec)
    config = getattr(model, "config", None)
    vision_config = getattr(config, "vision_config", config)
    size = getattr(vision_config, "image_size", 224)
    size = size if isinstance(size, int) else int(size[0] if isinstance(size, (list, tuple)) else size["height"])
    mean, std = CLIP_MEAN, CLIP_STD
    if processor_source is not None:
        with contextlib.suppress(Exception):  # no image processor saved: keep CLIP's statistics
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(processor_source)
            mean, std = processor.image_mean, processor.image_std
    return PretrainedImageFeatures(model, "transformers", spec, size, mean, std)


def load_backbone(spec: Any = DEFAULT_BACKBONE, device: str | torch.device = "cpu") -> nn.Module:
    """A frozen feature extractor ``[N, 3, H, W] in [0, 1] -> [N, C, P]`` (C features in each
    of P grid cells; P = 1 for a global embedding) from a spec (see the
    module docstring) or a model object (an AutoencoderKL, an open_clip / transformers CLIP,
    a transformers vision model, or a ready extractor). It has ``.spec`` (saved in the head's
    config) and ``.image_size`` (inputs are resized to it; None = any size)."""
    if isinstance(spec, (VAEFeatures, PretrainedImageFeatures)):
        return spec.to(device)
    if isinstance(spec, nn.Module):
        if hasattr(spec, "encoder") and hasattr(getattr(spec, "config", None), "latent_channels"):
            return VAEFeatures(spec).to(device)
        if hasattr(spec, "encode_image"):
            from rewards.clip import ClipEncoder

            return PretrainedImageFeatures(ClipEncoder(spec, device=device), "clip")
        return _transformers_backbone(spec, "custom").to(device)
    if not isinstance(spec, str):
        raise TypeError(f"backbone must be a spec string or a model, got {type(spec).__name__}")
    scheme, _, rest = spec.partition(":")
    if spec == DEFAULT_BACKBONE:
        from samplers.models.shapesworld import SHAPESWORLD_DIR

        backbone = VAEFeatures(_vae_from_path(str(SHAPESWORLD_DIR / "vae")), spec)
    elif scheme == "vae" and rest:
        backbone = VAEFeatures(_vae_from_path(rest), spec)
    elif scheme == "torchvision" and rest:
        name, _, weights = rest.partition(":")
        backbone = _torchvision_backbone(spec, name, weights or None)
    elif scheme == "open_clip" and rest:
        from rewards.clip import ClipEncoder

        name, _, pretrained = rest.partition(":")
        backbone = PretrainedImageFeatures(ClipEncoder(name, pretrained=pretrained or None, device=device),
                                           "clip", spec)
    elif scheme == "hf" and rest:
        from transformers import AutoModel

        backbone = _transformers_backbone(AutoModel.from_pretrained(rest), spec, processor_source=rest)
    else:
        raise ValueError(f"unknown artefact backbone {spec!r}; use {DEFAULT_BACKBONE!r}, 'vae:PATH', "
                         "'torchvision:NAME[:WEIGHTS]', 'open_clip:NAME[:PRETRAINED]' or 'hf:ID_OR_PATH'")
    return backbone.to(device)


# ----------------------------------------------------------------------------- head


class ArtifactHead(nn.Module):
    """Artefact logit from a feature grid: [N, C, P] -> [N].

    Each of the P cells is classified by the same MLP on its standardised C features; the image
    logit is the log-sum-exp over cells (a soft maximum: one blotch in one corner counts).
    With P = 1 (a global embedding) it is a plain MLP.
    """

    def __init__(self, channels: int, hidden: int = 32):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(channels))
        self.register_buffer("feature_std", torch.ones(channels))
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        cells = (features.float().transpose(1, 2) - self.feature_mean) / self.feature_std  # [N, P, C]
        # No "- log P": the image logit starts at log P (every cell mildly suspect), so training
        # pushes clean cells far down and the pooling works as a maximum. Subtracting log P starts
        # it as a mean instead, which learnt worse in 1,000 steps (held-out AUROC 0.957 vs 0.980).
        return torch.logsumexp(self.mlp(cells).squeeze(-1), dim=1)  # [N]


def save_head(directory: str | Path, head: ArtifactHead, config: dict) -> Path:
    """Write ``head.safetensors`` + ``config.json`` into ``directory`` (created if needed)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_head(directory: str | Path) -> tuple[ArtifactHead, dict]:
    """(head in eval mode, config) from a folder written by :func:`save_head`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no artefact head ({CONFIG_FILE} + {WEIGHTS_FILE}); "
                                "train one with `align train-artifact --out DIR`")
    config = json.loads((directory / CONFIG_FILE).read_text())
    head = ArtifactHead(config["channels"], config["hidden"])
    head.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return head.eval().requires_grad_(False), config


# ----------------------------------------------------------------------------- reward


@register_reward("artifact_classifier")
class ArtifactClassifierReward(Reward):
    """reward = 1 - P(artefact), P from a trained head on a frozen backbone's features.

    path: a folder with ``head.safetensors`` + ``config.json`` (default: the shipped
    ShapesWorld head). backbone: override the config's backbone (a spec or a model object;
    needed when the head was trained on a model object). Inputs whose size differs from the
    backbone's ``image_size`` are resized (bilinear, antialiased). Videos are scored frame
    by frame and averaged over T.

    Raw range [0, 1] (1 = no artefact). Differentiable if the backbone is (the default VAE
    one is). Prompt-blind. extras: "p_artifact" [B].
    """

    name = "artifact_classifier"
    raw_range = (0.0, 1.0)
    differentiable = True
    modalities = (IMAGE, VIDEO)
    requires_prompts = False

    def __init__(self, path: str | Path | None = None, backbone: Any = None, device: str | torch.device = "cpu",
                 batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(path) if path is not None else SHIPPED_HEAD_DIR
        head, self.config = load_head(self.path)
        spec = backbone if backbone is not None else self.config["backbone"]
        if isinstance(spec, str) and spec.startswith("custom"):
            raise ValueError(f"{self.path}: the head was trained on a model object ({spec}); pass it as backbone=")
        self.backbone = load_backbone(spec, device)
        self.head = head.to(device)
        self.device, self.batch_size = torch.device(device), batch_size

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "ArtifactClassifierReward":
        """The reward from a head folder written by ``align train-artifact`` / :func:`save_head`."""
        return cls(path, **kwargs)

    def logits(self, images: Tensor) -> Tensor:
        """[N, 3, H, W] in [0, 1] -> [N] artefact logits (differentiable)."""
        chunks = [self.head(self.backbone(images[i:i + self.batch_size].to(self.device)))
                  for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(chunks)

    def score(self, samples: Tensor, prompts=None, **kwargs) -> RewardOutput:
        images, frames = frames_as_images(samples)  # [B*T, 3, H, W]
        p_artifact = torch.sigmoid(self.logits(images)).view(-1, frames).mean(1)  # [B]
        return RewardOutput(1 - p_artifact, {"p_artifact": p_artifact.detach()})


# ----------------------------------------------------------------------------- training


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (1 = positive): the probability that
    a random positive scores above a random negative, ties counting 1/2 (Mann-Whitney U)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    start = 0
    while start < len(scores):  # average ranks (1-based) over runs of tied scores
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def heldout_metrics(p_artifact: np.ndarray, labels: np.ndarray, kinds: Sequence[str],
                    source: Sequence[str] | None = None) -> dict:
    """AUROC overall, per artefact kind (that kind vs every clean image) and per clean source,
    and accuracy at P = 0.5."""
    p_artifact, labels, kinds = np.asarray(p_artifact), np.asarray(labels), np.asarray(kinds)
    clean = kinds == "clean"
    metrics = {"auroc": auroc(p_artifact, labels), "accuracy": float(((p_artifact > 0.5) == (labels > 0.5)).mean()),
               "n": int(len(labels)), "auroc_per_kind": {}}
    for kind in sorted(set(kinds.tolist()) - {"clean"}):
        keep = clean | (kinds == kind)
        metrics["auroc_per_kind"][kind] = auroc(p_artifact[keep], labels[keep])
    if source is not None:
        source = np.asarray(source)
        metrics["auroc_per_source"] = {s: auroc(p_artifact[source == s], labels[source == s])
                                       for s in sorted(set(source.tolist()))}
    return metrics


def _model_samples(n: int, split: str, seed_offset: int, rng: np.random.Generator, generator: str,
                   show: bool) -> np.ndarray:
    """n base-model samples of random `split` prompts (category-balanced), seeds seed_offset + i."""
    from eval.shapes.world import TAGS, prompts
    from samplers.generate import generate
    from samplers.models import load_model

    if n <= 0:
        return np.zeros((0, 64, 64, 3), np.uint8)
    by_tag = {tag: [m["prompt"] for m in prompts(split) if m["tag"] == tag] for tag in TAGS}
    texts = []
    for _ in range(n):
        options = by_tag[TAGS[int(rng.integers(len(TAGS)))]]
        texts.append(options[int(rng.integers(len(options)))])
    model = load_model(generator)
    with progress_bar(n, f"sampling {split} images", show) as advance:
        images = generate(model, texts, [seed_offset + i for i in range(n)], batch_size=32, progress=advance)
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def _embed(backbone: nn.Module, images: np.ndarray, description: str, show: bool, batch: int = 128) -> Tensor:
    """(N, H, W, 3) uint8 -> [N, C, P] backbone feature grids, stored in float16 (the head
    standardises them in float32; 4,096 VAE grids take 285 MB instead of 570)."""
    out = []
    with progress_bar(len(images), description, show) as advance:
        for i in range(0, len(images), batch):
            chunk = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float() / 255
            out.append(backbone(chunk).half())
            advance(len(chunk))
    return torch.cat(out)


def _channel_stats(features: Tensor, batch: int = 512) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std over images and cells of [N, C, P] features (chunked, float64)."""
    total = torch.zeros(features.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for i in range(0, len(features), batch):
        chunk = features[i:i + batch].double()
        total += chunk.sum((0, 2))
        squares += chunk.square().sum((0, 2))
    count = features.shape[0] * features.shape[2]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return mean.float(), std.float().clamp_min(1e-6)


@torch.no_grad()
def _predict(head: ArtifactHead, features: Tensor, batch: int = 512) -> np.ndarray:
    """P(artefact) [N] for [N, C, P] features."""
    return torch.cat([torch.sigmoid(head(features[i:i + batch])) for i in range(0, len(features), batch)]).numpy()


def train_artifact_head(out: str | Path | None = None, *, seed: int = 0, backbone: Any = DEFAULT_BACKBONE,
                        renders: int = 1536, model_samples: int = 512, test_renders: int = 384,
                        test_model_samples: int = 128, steps: int = 1000, batch: int = 128, lr: float = 3e-3,
                        weight_decay: float = 1e-2, hidden: int = 32, severity: tuple[float, float] = (0.0, 1.0),
                        generator: str = "shapesworld", threads: int = 1, show_progress: bool = True,
                        log=print) -> dict:
    """Train the artefact head and (if ``out``) write it there atomically. Returns the config
    dict, whose "heldout" entry holds AUROC overall / per kind / per clean source.

    Training data: ``renders`` train-split renders + ``model_samples`` base-model samples of
    train-split prompts (seeds 0..), each clean and once corrupted. Held-out data: test-split
    renders and base-model samples (seeds 1,000,000..), corrupted with a separate rng stream.
    The backbone is frozen; features are computed once, then the head is trained with BCE
    (AdamW, minibatches of ``batch``, cosine learning-rate decay) for ``steps`` steps.
    """
    from eval.shapes.artifacts import KINDS, sample_artifact_dataset

    start = time.time()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    train_rng, test_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    extractor = load_backbone(backbone)

    train_samples = _model_samples(model_samples, "train", 0, train_rng, generator, show_progress)
    test_samples = _model_samples(test_model_samples, "test", 1_000_000, test_rng, generator, show_progress)
    train = sample_artifact_dataset(renders, train_rng, "train", train_samples, severity=severity)
    test = sample_artifact_dataset(test_renders, test_rng, "test", test_samples, severity=severity)
    x_train = _embed(extractor, train.images, "embedding training images", show_progress)
    x_test = _embed(extractor, test.images, "embedding held-out images", show_progress)
    y_train = torch.from_numpy(train.labels)
    log(f"data: {len(y_train)} training / {len(test.labels)} held-out images, {x_train.shape[1]} features x "
        f"{x_train.shape[2]} cells ({time.time() - start:.0f} s)")

    head = ArtifactHead(x_train.shape[1], hidden)
    mean, std = _channel_stats(x_train)
    head.feature_mean.copy_(mean)
    head.feature_std.copy_(std)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps))
    generator_ = torch.Generator().manual_seed(seed)
    head.train()
    with progress_bar(steps, "training head", show_progress) as advance:
        for step in range(steps):
            idx = torch.randint(0, len(y_train), (min(batch, len(y_train)),), generator=generator_)
            loss = F.binary_cross_entropy_with_logits(head(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            advance(1)
            if step % 500 == 0 or step == steps - 1:
                log(f"step {step}: bce {loss.item():.4f}")
    head.eval().requires_grad_(False)

    p_train, p_test = _predict(head, x_train), _predict(head, x_test)
    heldout = heldout_metrics(p_test, test.labels, test.kinds, test.source)
    train_auroc = auroc(p_train, train.labels)
    elapsed = time.time() - start
    log(f"held-out AUROC {heldout['auroc']:.4f} (train {train_auroc:.4f}), accuracy {heldout['accuracy']:.3f}; "
        + ", ".join(f"{k} {v:.4f}" for k, v in heldout["auroc_per_kind"].items())
        + "; by clean source: " + ", ".join(f"{k} {v:.4f}" for k, v in heldout.get("auroc_per_source", {}).items())
        + f" ({elapsed:.0f} s)")

    spec = getattr(extractor, "spec", "custom")
    config = {
        "format": "genalign-artifact-head", "version": 1,
        "backbone": spec if spec != "custom" else f"custom:{type(backbone).__name__}",
        "channels": int(x_train.shape[1]), "cells": int(x_train.shape[2]), "hidden": hidden,
        "image_size": getattr(extractor, "image_size", None),
        "kinds": list(KINDS),
        "training": dict(seed=seed, renders=renders, model_samples=model_samples, test_renders=test_renders,
                         test_model_samples=test_model_samples, steps=steps, batch=batch, lr=lr,
                         weight_decay=weight_decay, severity=list(severity), generator=generator, threads=threads,
                         seconds=round(elapsed, 1)),
        "train_auroc": train_auroc,
        "heldout": heldout,
    }
    if out is not None:
        from align.checkpoint import replace_dir  # the one atomic folder swap (kept in align)

        out = Path(out)
        work = out.with_name(f".{out.name}.partial")
        shutil.rmtree(work, ignore_errors=True)
        save_head(work, head, config)
        out.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(work, out)
        log(f"wrote {out}")
    return config


def add_arguments(parser) -> None:
    """`align train-artifact` options (defaults = the shipped head's run)."""
    parser.add_argument("--out", type=Path, default=SHIPPED_HEAD_DIR,
                        help="output folder (default: the package's shipped head)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE,
                        help="shapesworld_vae | vae:PATH | torchvision:NAME[:WEIGHTS] | "
                             "open_clip:NAME[:PRETRAINED] | hf:ID_OR_PATH")
    parser.add_argument("--renders", type=int, default=1536, help="clean training renders (each also corrupted)")
    parser.add_argument("--model-samples", type=int, default=512, help="clean base-model training samples")
    parser.add_argument("--test-renders", type=int, default=384)
    parser.add_argument("--test-model-samples", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1000, help="head training steps")
    parser.add_argument("--batch", type=int, default=128, help="head training batch (images)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)


def main(args) -> dict:
    return train_artifact_head(args.out, seed=args.seed, backbone=args.backbone, renders=args.renders,
                               model_samples=args.model_samples, test_renders=args.test_renders,
                               test_model_samples=args.test_model_samples, steps=args.steps, batch=args.batch, lr=args.lr,
                               threads=args.threads)
