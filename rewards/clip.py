"""CLIP-family rewards: CLIPScore, VLM-RM, PickScore, HPSv2.1 and the LAION aesthetic predictor.

Each reward embeds images (and prompts) with a CLIP model held by a :class:`ClipEncoder`,
which accepts either a name (an open_clip model name / ``hf-hub:`` / ``local-dir:`` id, or a
transformers hub id / local directory) or an already-built model object (an open_clip
``CLIP`` or a transformers ``CLIPModel``), so tests run tiny random models of the real
classes. Preprocessing (short side resized to the model's input size, bicubic with
antialiasing, centre crop, CLIP mean/std) is done in torch on the [0, 1] samples, so every
score here is differentiable w.r.t. the pixels. Videos ``(B, 3, T, H, W)`` are scored frame
by frame and averaged over T.

    reward = build_reward({"name": "pickscore", "device": "cuda", "dtype": "fp16"})
    out = reward(images, prompts)        # out.scores [B]; out.extras["cosine"] [B]

Scores of preference models (PickScore, HPS) are comparable only within one prompt: combine
them with ``WeightedSum(normalize="group")`` (rewards/compose.py).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewards.base import IMAGE, VIDEO, Reward, RewardOutput, frames_as_images, register_reward

__all__ = [
    "ClipEncoder",
    "ClipScoreReward",
    "VLMRMReward",
    "PickScoreReward",
    "HPSv2Reward",
    "AestheticHead",
    "AestheticReward",
]

# OpenAI CLIP's normalisation, also used by the LAION OpenCLIP models named here.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _hub_file(spec: str) -> str:
    """A local file path as is, or ``"owner/repo:filename"`` fetched (and cached) from the hub."""
    if os.path.exists(spec):
        return spec
    repo, sep, filename = spec.partition(":")
    if not sep or "/" not in repo:
        raise FileNotFoundError(f"{spec!r} is neither a local file nor 'owner/repo:filename' on the hub")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename)


def _load_clip(name: str, pretrained: str | None):
    """Loads a CLIP model by name: open_clip for its model names and schemas, else transformers."""
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")) or name in open_clip.list_models():
        model = open_clip.create_model(name, pretrained=pretrained, require_pretrained=True)
        return model, open_clip.get_tokenizer(name)
    if pretrained is not None:
        raise ValueError(f"pretrained={pretrained!r} is for open_clip model names; {name!r} is not one, "
                         "so it is loaded with transformers' CLIPModel.from_pretrained (drop pretrained=)")
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(name), None


class ClipEncoder:
    """A frozen CLIP model behind one interface: ``embed_images``, ``embed_texts``, ``logit_scale``.

    model:      an open_clip model (anything with ``encode_image`` / ``encode_text``), a
                transformers ``CLIPModel``, or a string: an open_clip model name (``"ViT-H-14"``,
                weights from ``pretrained``, a tag or a file; or ``"hf-hub:org/repo"``,
                ``"local-dir:/path"``) or a transformers hub id / local directory.
    tokenizer:  open_clip: a callable ``list[str] -> LongTensor [N, L]``; transformers: a
                tokenizer. Default: the model's own (loaded by name), else from ``processor``,
                else the exact CLIP BPE rebuilt offline (right for every OpenAI-vocabulary CLIP).
    processor:  transformers only: a ``CLIPProcessor`` or where to load one from (hub id or
                path); gives the tokenizer and the image mean/std (e.g. PickScore's LAION one).
    device, dtype: where and in which precision the model runs (default: where it is; a
                model loaded by name goes to CUDA when available). dtype: torch.dtype or
                "fp32" / "bf16" / "fp16" (half precision is for GPUs).
    batch_size: images (and texts) per forward pass.

    The model is put in eval mode with gradients off for its parameters; gradients still
    flow from the embeddings back to the input pixels.
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, pretrained: str | None = None, processor: Any = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                 batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(model, (str, os.PathLike)):
            model, loaded_tokenizer = _load_clip(str(model), pretrained)
            tokenizer = loaded_tokenizer if tokenizer is None else tokenizer
            if processor is None and loaded_tokenizer is None:
                processor = str(model.name_or_path)  # transformers: tokenizer beside the weights
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        elif pretrained is not None:
            raise ValueError("pretrained= applies only when model is a name or path, not a model object")
        self.is_open_clip = hasattr(model, "encode_image") and hasattr(model, "encode_text")
        if not self.is_open_clip and not hasattr(model, "get_image_features"):
            raise TypeError(f"expected an open_clip model or a transformers CLIPModel, got {type(model).__name__}")
        if isinstance(processor, (str, os.PathLike)):
            from transformers import CLIPProcessor

            processor = CLIPProcessor.from_pretrained(str(processor))
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be a torch.dtype or one of {sorted(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        parameter = next(self.model.parameters())
        self.device, self.dtype, self.batch_size = parameter.device, parameter.dtype, batch_size

        if self.is_open_clip:
            import open_clip

            config = open_clip.get_model_preprocess_cfg(model)
            size, mean, std = config.get("size"), config.get("mean"), config.get("std")
            self.context_length = getattr(model, "context_length", 77)
            if tokenizer is None:
                tokenizer = open_clip.SimpleTokenizer(context_length=self.context_length)
        else:
            size = model.config.vision_config.image_size
            image_processor = getattr(processor, "image_processor", None)
            mean = getattr(image_processor, "image_mean", None)
            std = getattr(image_processor, "image_std", None)
            self.context_length = model.config.text_config.max_position_embeddings
            if tokenizer is None:
                tokenizer = getattr(processor, "tokenizer", None)
            if tokenizer is None:
                from samplers.models.clip_tokenizer import build_clip_tokenizer

                tokenizer = build_clip_tokenizer(self.context_length)
        self.tokenizer = tokenizer
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)  # (h, w)
        self.mean = torch.tensor(mean or OPENAI_MEAN, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(std or OPENAI_STD, device=self.device).view(3, 1, 1)

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): the learnt inverse temperature of CLIP's contrastive logits."""
        return float(self.model.logit_scale.detach().float().exp())

    def preprocess(self, images: Tensor) -> Tensor:
        """[N, 3, H, W] in [0, 1] -> [N, 3, h, w] model input: CLIP's eval transform (short side
        resized, bicubic with antialiasing; centre crop; mean/std), differentiable."""
        (h, w), (height, width) = self.image_size, images.shape[-2:]
        if (height, width) != (h, w):
            scale = max(h / height, w / width)
            new = (max(h, int(height * scale)), max(w, int(width * scale)))
            images = F.interpolate(images, size=new, mode="bicubic", antialias=True, align_corners=False)
            top, left = round((new[0] - h) / 2), round((new[1] - w) / 2)
            images = images[..., top:top + h, left:left + w]
        return (images.float() - self.mean) / self.std

    def embed_images(self, images: Tensor) -> Tensor:
        """[N, 3, H, W] in [0, 1] -> [N, D] float32 unit-norm image embeddings (differentiable)."""
        images = images.to(self.device)
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            pixels = self.preprocess(images[start:start + self.batch_size]).to(self.dtype)
            if self.is_open_clip:
                features = self.model.encode_image(pixels)
            else:
                features = self.model.get_image_features(pixel_values=pixels)
            chunks.append(_features(features).float())
        return F.normalize(torch.cat(chunks), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """N strings -> [N, D] float32 unit-norm text embeddings (each distinct text encoded once)."""
        unique = list(dict.fromkeys(texts))
        chunks = []
        for start in range(0, len(unique), self.batch_size):
            batch = unique[start:start + self.batch_size]
            if self.is_open_clip:
                features = self.model.encode_text(self.tokenizer(batch).to(self.device))
            else:
                tokens = self.tokenizer(batch, padding=True, truncation=True, max_length=self.context_length,
                                        return_tensors="pt").to(self.device)
                features = self.model.get_text_features(input_ids=tokens["input_ids"],
                                                        attention_mask=tokens["attention_mask"])
            chunks.append(_features(features).float())
        embeddings = F.normalize(torch.cat(chunks), dim=-1)
        row = {text: i for i, text in enumerate(unique)}
        return embeddings[[row[text] for text in texts]]


def _features(output: Any) -> Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projected embedding.
    return output if isinstance(output, Tensor) else output.pooler_output


class _ClipReward(Reward):
    """Shared plumbing: the encoder, and videos scored frame by frame (mean over T).

    Subclasses implement ``score_embeddings(images [N, D], texts) -> (scores [N], extras)``.
    """

    differentiable = True
    modalities = (IMAGE, VIDEO)

    def __init__(self, model: Any, tokenizer: Any = None, *, pretrained: str | None = None, processor: Any = None,
                 device=None, dtype=None, batch_size: int = 32):
        if isinstance(model, ClipEncoder):
            self.encoder = model  # shared between rewards
        else:
            self.encoder = ClipEncoder(model, tokenizer, pretrained=pretrained, processor=processor,
                                       device=device, dtype=dtype, batch_size=batch_size)

    def score_embeddings(self, images: Tensor, texts: list[str] | None) -> tuple[Tensor, dict]:
        raise NotImplementedError

    def score(self, samples: Tensor, prompts: Sequence[str] | None, **kwargs) -> RewardOutput:
        images, frames = frames_as_images(samples)  # [B*T, 3, H, W]
        texts = None if prompts is None else [p for p in prompts for _ in range(frames)]
        scores, extras = self.score_embeddings(self.encoder.embed_images(images), texts)  # [B*T]

        def per_sample(values: Tensor) -> Tensor:
            return values.view(-1, frames).mean(1)  # [B]

        return RewardOutput(per_sample(scores), {k: per_sample(v).detach() for k, v in extras.items()})


@register_reward("clip_score")
class ClipScoreReward(_ClipReward):
    """CLIPScore (Hessel et al. 2021, "CLIPScore", eq. 1): w * max(cos(image, "A photo depicts "
    + prompt), 0) with w = 2.5, on OpenAI CLIP ViT-B/32 by default.

    Raw range [0, scale]; real images and captions score about 0.5-0.9 with ViT-B/32. Other
    scales in use: torchmetrics is ``scale=100, prefix=""``; flow_grpo's raw cosine has no
    clamp (read extras["cosine"]). extras: "cosine" [B] (unclamped).
    """

    name = "clip_score"

    def __init__(self, model: Any = "openai/clip-vit-base-patch32", tokenizer: Any = None, *,
                 scale: float = 2.5, prefix: str = "A photo depicts ", **encoder_kwargs):
        super().__init__(model, tokenizer, **encoder_kwargs)
        self.scale, self.prefix = float(scale), prefix
        self.raw_range = (0.0, self.scale)

    def score_embeddings(self, images, texts):
        cosine = (images * self.encoder.embed_texts([self.prefix + t for t in texts])).sum(-1)  # [N]
        return self.scale * cosine.clamp_min(0), {"cosine": cosine}


@register_reward("vlm_rm")
class VLMRMReward(_ClipReward):
    """Zero-shot VLM-RM (Rocamonde et al. 2024, "Vision-Language Models are Zero-Shot Reward
    Models for Reinforcement Learning", goal-baseline regularisation, sec. 3):

        R = 1 - 0.5 ||(x - g) P||^2,   P = alpha d d^T / ||d||^2 + (1 - alpha) I,   d = g - b

    x: the unit image embedding; g, b: the means of the unit embeddings of the goal and the
    baseline prompts. alpha = 0 is plain similarity (R = cos(x, g) for one goal prompt);
    alpha = 1 keeps only the goal-baseline direction.

    goal:     a prompt or list of prompts; None (default) uses each sample's own prompt.
    baseline: a prompt or list of prompts describing the environment without the goal
              (e.g. "a photo"); needed when alpha > 0.
    alpha:    in [0, 1]; the paper sweeps it per task.

    Default model: OpenCLIP ViT-bigG-14 (LAION-2B), the paper's largest. Raw range [-1, 1]
    (||P v|| <= ||v|| <= 2). extras: "cosine" [B] = x . g / ||g||.
    """

    name = "vlm_rm"
    raw_range = (-1.0, 1.0)

    def __init__(self, model: Any = "hf-hub:laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", tokenizer: Any = None, *,
                 goal: str | Sequence[str] | None = None, baseline: str | Sequence[str] | None = None,
                 alpha: float = 0.0, **encoder_kwargs):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"vlm_rm alpha must be in [0, 1], got {alpha}")
        if alpha > 0 and not baseline:
            raise ValueError("vlm_rm: alpha > 0 projects onto the goal-baseline direction; give baseline=")
        self.goal = [goal] if isinstance(goal, str) else (list(goal) if goal else None)
        self.baseline = [baseline] if isinstance(baseline, str) else (list(baseline) if baseline else None)
        self.alpha = float(alpha)
        self.requires_prompts = self.goal is None
        super().__init__(model, tokenizer, **encoder_kwargs)
        self._mean_embeddings: dict[tuple[str, ...], Tensor] = {}

    def _mean_embedding(self, prompts: list[str]) -> Tensor:
        """Mean of the prompts' unit embeddings, [D] (cached: goal and baseline are fixed)."""
        key = tuple(prompts)
        if key not in self._mean_embeddings:
            self._mean_embeddings[key] = self.encoder.embed_texts(prompts).mean(0)
        return self._mean_embeddings[key]

    def score_embeddings(self, images, texts):
        goal = self._mean_embedding(self.goal) if self.goal else self.encoder.embed_texts(texts)  # [D] | [N, D]
        goal = goal.expand_as(images)  # [N, D]
        residual = images - goal  # [N, D]
        if self.alpha > 0:
            direction = goal - self._mean_embedding(self.baseline)  # [N, D]
            along = (residual * direction).sum(-1, keepdim=True) / direction.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
            residual = (1 - self.alpha) * residual + self.alpha * along * direction  # (x - g) P, P symmetric
        reward = 1 - 0.5 * residual.pow(2).sum(-1)  # [N]
        return reward, {"cosine": (images * goal).sum(-1) / goal.norm(dim=-1).clamp_min(1e-12)}


@register_reward("pickscore")
class PickScoreReward(_ClipReward):
    """PickScore (Kirstain et al. 2023, "Pick-a-Pic", sec. 4): s = exp(logit_scale) * cos(image,
    prompt), a CLIP-H fine-tuned on human preferences (``yuvalkirstain/PickScore_v1`` with the
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor). A softmax of s over the images of
    one prompt gives the preference probabilities. ``processor`` defaults to the LAION one
    when ``model`` is loaded by name.

    Raw range [-exp(logit_scale), exp(logit_scale)] (about +-100); SD images score about
    18-23 and only differences within one prompt are meaningful. extras: "cosine" [B].
    """

    name = "pickscore"

    def __init__(self, model: Any = "yuvalkirstain/PickScore_v1", tokenizer: Any = None, *,
                 processor: Any = None, **encoder_kwargs):
        if processor is None and isinstance(model, (str, os.PathLike)):
            processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the processor the PickScore authors use
        super().__init__(model, tokenizer, processor=processor, **encoder_kwargs)
        self.raw_range = (-self.encoder.logit_scale, self.encoder.logit_scale)

    def score_embeddings(self, images, texts):
        cosine = (images * self.encoder.embed_texts(texts)).sum(-1)  # [N]
        return self.encoder.logit_scale * cosine, {"cosine": cosine}


@register_reward("hpsv2")
class HPSv2Reward(_ClipReward):
    """HPSv2.1 (Wu et al. 2023, "Human Preference Score v2"): cos(image, prompt) of OpenCLIP
    ViT-H-14 fine-tuned on HPD v2, no logit scale.

    checkpoint: the HPS weights loaded into ``model`` when it is a name: a local file or
    ``"owner/repo:filename"`` (default v2.1, ``xswu/HPSv2:HPS_v2.1_compressed.pt``; the
    hpsv2 package defaults to v2.0, which scores differently). Ignored for model objects.

    Raw range [-1, 1]; SD images score about 0.2-0.35, comparable only within one prompt.
    """

    name = "hpsv2"
    raw_range = (-1.0, 1.0)

    def __init__(self, model: Any = "ViT-H-14", tokenizer: Any = None, *,
                 checkpoint: str = "xswu/HPSv2:HPS_v2.1_compressed.pt", **encoder_kwargs):
        if isinstance(model, (str, os.PathLike)):
            encoder_kwargs["pretrained"] = _hub_file(checkpoint)
        super().__init__(model, tokenizer, **encoder_kwargs)

    def score_embeddings(self, images, texts):
        return (images * self.encoder.embed_texts(texts)).sum(-1), {}


class AestheticHead(nn.Module):
    """The LAION improved aesthetic predictor's head: five linear layers, no activations
    (dropout only in training). Layer indices match ``sac+logos+ava1-l14-linearMSE.pth``."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        """[N, D] unit-norm CLIP image embeddings -> [N] predicted mean rating (AVA's 1-10 scale)."""
        return self.layers(embeddings).squeeze(-1)


@register_reward("aesthetic")
class AestheticReward(_ClipReward):
    """LAION aesthetic predictor v2 (Schuhmann, "improved-aesthetic-predictor"; DDPO's
    aesthetic reward, Black et al. 2024): an MLP on the L2-normalised OpenAI CLIP ViT-L/14
    image embedding, regressed on SAC + LAION-Logos + AVA ratings.

    head: an :class:`AestheticHead` (or any module [N, D] -> [N]), or its state dict as a
    local file or ``"owner/repo:filename"`` (default: TRL's hub copy of
    ``sac+logos+ava1-l14-linearMSE.pth``). Prompt-blind.

    Raw range unbounded in principle, in practice the 1-10 rating scale: photos score about
    4-7, LAION's "aesthetic" subset is >= 6.5.
    """

    name = "aesthetic"
    raw_range = (-math.inf, math.inf)
    requires_prompts = False

    def __init__(self, model: Any = "openai/clip-vit-large-patch14", tokenizer: Any = None, *,
                 head: nn.Module | str = "trl-lib/ddpo-aesthetic-predictor:aesthetic-model.pth", **encoder_kwargs):
        super().__init__(model, tokenizer, **encoder_kwargs)
        if not isinstance(head, nn.Module):
            state = torch.load(_hub_file(str(head)), map_location="cpu", weights_only=True)
            head = AestheticHead(state["layers.0.weight"].shape[1])
            head.load_state_dict(state)
        self.head = head.to(self.encoder.device, torch.float32).eval().requires_grad_(False)

    def score_embeddings(self, images, texts):
        return self.head(images), {}
