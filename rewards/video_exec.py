"""Video execution reward model (ExeVRM, "Video-Based Reward Modeling for Computer-Use Agents").

- "video_exec" (:class:`VideoExecJudge`): instruction + screen-recording video -> P(success),
  read from the first answer token's logits: P = sigmoid(lse(yes tokens) - lse(no tokens)), as
  :class:`rewards.vlm.YesNoJudge` does for images. Raw range [0, 1], 1 = the video shows the
  instruction carried out. Optional temporal attribution (``interval=True``): for videos judged
  failed the model continues its answer greedily ("No 3-5") and the deviation interval
  [first, last] (seconds at the judge's fps) is parsed; unparsable -> NaN, counted.
- Spatiotemporal token pruning (rewards/token_pruning.py, ``pruning=``; on by default) drops
  homogeneous-background and repeated visual tokens after M-RoPE positions are computed.
  extras: "kept_token_ratio" [B] per video, "visual_tokens" [B], "yes_no_mass" [B].
- Inputs: videos [B, 3, T, H, W] in [0, 1] (frames taken as sampled at ``fps``) through the
  reward signature, or files through :meth:`VideoExecJudge.judge_files` (rewards/video_io.py:
  decord / PyAV at ``fps``, ``max_frames``, ``max_pixels``). ``align score`` gives videos as
  tensors (eval/score.py samples 16 evenly spaced frames).
- Models: any Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint by hub id or folder (e.g. an ExeVRM-8B
  Qwen3-VL fine-tune: ``model="<id or path>"``), or the tiny judge trained on synthetic GUI
  videos (:func:`tiny_video_vlm`, ``align train-exevrm``; shipped in
  ``rewards/models/weights/video_exec_judge/``, 1.7 MB: held-out accuracy 0.93, recall 0.97 with
  pruning, 0.83 / 0.72 without; its settings and metrics in ``video_exec.json``). A folder may
  carry a ``video_exec.json`` with the judge's settings (template, answer words, fps, pruning).
- :func:`train_video_judge`: fine-tunes on rows {video (path or frames), instruction, label,
  interval?} with teacher-forced CE on the answer ("Yes" / "No s-e").
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from rewards.base import VIDEO, Reward, RewardOutput, register_reward
from rewards.token_pruning import PruningConfig, prune_visual_tokens, qwen_video_patches, sequence_keep_mask, \
    video_token_keep
from rewards.video_io import read_video
from rewards.vlm import QWEN_SPECIALS, LocalVLM, _first_token_ids, byte_tokenizer, logits_at
from samplers.progress import track

__all__ = ["VideoExecJudge", "tiny_video_vlm", "train_video_judge", "EXEC_TEMPLATE", "SHIPPED_JUDGE_DIR",
           "SHIPPED_JUDGE_SHA256", "DESCRIBE_QUESTION",
           "parse_interval", "answer_text"]

SHIPPED_JUDGE_DIR = Path(__file__).parent / "models" / "weights" / "video_exec_judge"
# samplers.models.shapesworld.weights_checksum() of the shipped judge: `align train-exevrm`, then its interval stage
# twice (README "Video execution judge"; video_exec.json records the command of each stage).
SHIPPED_JUDGE_SHA256 = "712eddacf6a08bae172d22d86294fd598202dca1e4e6eb6b2bcc572c7669b9b3"
SETTINGS_FILE = "video_exec.json"
DESCRIBE_QUESTION = "What did the agent do?"  # the auxiliary task of train_video_judge(describe_weight=...)
EXEC_TEMPLATE = ("The video is a screen recording of a computer-use agent. Instruction: \"{instruction}\". "
                 "Did the agent complete the instruction? Answer Yes or No.")
_INTERVAL = re.compile(r"(\d+(?:\.\d+)?)\s*(?:-|to|,)\s*(\d+(?:\.\d+)?)")


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """First "a-b" (or "a to b", "a, b") pair of numbers in ``text`` as (start, end) seconds."""
    match = _INTERVAL.search(text or "")
    if match is None:
        return None
    start, end = float(match.group(1)), float(match.group(2))
    return (min(start, end), max(start, end))


def answer_text(label: int, interval: Sequence[float] | None, yes: str = "Yes", no: str = "No") -> str:
    """The training answer: "Yes", or "No" followed by the deviation interval when known."""
    if label:
        return yes
    return no if interval is None else f"{no} {int(interval[0])}-{int(interval[1])}"


# ----------------------------------------------------------------------------- tiny model

VIDEO_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>{{ '\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\n' }}{% endif %}"
)


def tiny_video_vlm(hidden_size: int = 96, num_layers: int = 2, num_heads: int = 4, vision_dim: int = 64,
                   vision_depth: int = 1, max_pixels: int = 224 * 168, seed: int = 0, words_from: Sequence[str] = (),
                   *, intermediate_size: int | None = None, num_kv_heads: int | None = None, vision_heads: int = 2,
                   vision_mlp_ratio: int = 2):
    """(model, processor): a small random Qwen2VLForConditionalGeneration built offline from a config.

    Byte-level tokenizer (each word of ``words_from`` one token), Qwen chat template with video parts, patch 14, temporal patch 2,
    spatial merge 2; the video processor keeps frames at <= ``max_pixels`` (224 x 168 -> 8 x 6
    tokens per frame pair). The language model's MLP is ``intermediate_size`` wide (default
    2 x ``hidden_size``) with ``num_kv_heads`` key/value heads (default: ``num_heads``)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = byte_tokenizer(QWEN_SPECIALS, words_from)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIALS}
    budget = {"shortest_edge": 56 * 56, "longest_edge": max_pixels}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels),
        video_processor=Qwen2VLVideoProcessor(size=budget, cap_pixels_per_frame=False),
        tokenizer=tokenizer, chat_template=VIDEO_CHAT_TEMPLATE)
    half = hidden_size // num_heads // 2
    section = [half // 4, half // 4 + (half // 4 if half % 4 == 0 else 0), 0]
    section[2] = half - section[0] - section[1]
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=intermediate_size or 2 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": section}),
        vision_config=dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden_size, num_heads=vision_heads,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, mlp_ratio=vision_mlp_ratio),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).eval(), processor


# ----------------------------------------------------------------------------- inputs


def _to_frames(video: Any) -> np.ndarray:
    """A video as uint8 [T, H, W, 3]: from a [3, T, H, W] float tensor in [0, 1] or an array."""
    if isinstance(video, Tensor):
        return (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    frames = np.asarray(video)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"a video must be uint8 [T, H, W, 3] or a [3, T, H, W] tensor, got shape {frames.shape}")
    return frames.astype(np.uint8, copy=False)


def _even(frames: np.ndarray) -> np.ndarray:
    """Qwen-VL groups frames in pairs (temporal patch 2): repeat the last frame of odd lengths."""
    return frames if len(frames) % 2 == 0 else np.concatenate([frames, frames[-1:]])


class VideoBatch:
    """Processor inputs for (instruction, video) pairs, optionally with appended answer text.

    inputs: dict of tensors for the model; keep: [B, L] token keep mask (None: no pruning);
    kept_ratio: [B] kept fraction of each video's visual tokens; visual_tokens: [B].
    """

    def __init__(self, vlm: LocalVLM, template: str, instructions: Sequence[str], videos: Sequence[np.ndarray],
                 pruning: PruningConfig | None, fps: float = 1.0, answers: Sequence[str] | None = None):
        processor, model = vlm.processor, vlm.model
        conversations = [[{"role": "user", "content": [{"type": "video"},
                                                         {"type": "text", "text": template.replace("{instruction}", text)}]}]
                         for text in instructions]
        texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        videos = [_even(_to_frames(v)) for v in videos]
        kwargs = {"do_sample_frames": False}
        if "qwen3" in type(processor).__name__.lower():  # timestamps in the prompt need the sampling rate
            kwargs["video_metadata"] = [{"fps": fps, "total_num_frames": len(v), "frames_indices": list(range(len(v)))}
                                        for v in videos]
        inputs = processor(text=texts, videos=videos, padding=True, padding_side="right", return_tensors="pt",
                           **kwargs)
        self.prefix_lengths = inputs["attention_mask"].sum(1)  # [B]
        if answers is not None:
            inputs = self._append(inputs, answers, vlm.tokenizer)
        self.inputs = {k: v.to(vlm.device, vlm.dtype) if v.is_floating_point() else v.to(vlm.device)
                       for k, v in inputs.items()}
        merge = model.config.vision_config.spatial_merge_size
        grids = qwen_video_patches(inputs["pixel_values_videos"], inputs["video_grid_thw"], merge)
        masks = [video_token_keep(grid, pruning, merge) for grid in grids]
        self.visual_tokens = torch.tensor([m.size for m in masks])
        self.kept_ratio = torch.tensor([float(m.mean()) for m in masks])
        self.keep = None if pruning is None else sequence_keep_mask(
            self.inputs["input_ids"], model.config.video_token_id, masks)

    @staticmethod
    def _append(inputs, answers: Sequence[str], tokenizer) -> dict:
        """Append each answer's tokens (+ end of turn) after its real prefix; right padding."""
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        targets = [tokenizer(a, add_special_tokens=False)["input_ids"] + ([end] if end is not None else [])
                   for a in answers]
        lengths = inputs["attention_mask"].sum(1)
        width = int(max(int(n) + len(t) for n, t in zip(lengths, targets)))
        per_token = [k for k, v in inputs.items() if v.ndim == 2 and v.shape == inputs["input_ids"].shape]
        out = {k: v for k, v in inputs.items() if k not in per_token}
        pad = tokenizer.pad_token_id or 0
        for key in per_token:
            out[key] = torch.full((len(answers), width), pad if key == "input_ids" else 0, dtype=inputs[key].dtype)
        labels = torch.full((len(answers), width), -100, dtype=torch.long)
        for i, target in enumerate(targets):
            n = int(lengths[i])
            for key in per_token:
                out[key][i, :n] = inputs[key][i, :n]
            out["input_ids"][i, n:n + len(target)] = torch.tensor(target)
            out["attention_mask"][i, n:n + len(target)] = 1
            labels[i, n:n + len(target)] = torch.tensor(target)
        out["labels_full"] = labels
        return out

    def pruned_positions(self, positions: Tensor) -> Tensor:
        """Full-sequence token positions [B, K] -> their index in the pruned sequence."""
        attended = self.inputs["attention_mask"].bool()
        kept = attended if self.keep is None else attended & self.keep
        return (kept.long().cumsum(1) - 1).gather(1, positions.to(kept.device))


def forward_logits(model, batch: VideoBatch, positions: Tensor) -> Tensor:
    """Logits [B, K, V] predicting the tokens AFTER full-sequence positions [B, K], with pruning."""
    inputs = {k: v for k, v in batch.inputs.items() if k != "labels_full"}
    with prune_visual_tokens(model, batch.keep):
        return logits_at(model, inputs, batch.pruned_positions(positions))


# ----------------------------------------------------------------------------- the reward


def judge_settings(model: Any) -> dict:
    """The ``video_exec.json`` settings saved beside a judge folder ({} for hub ids, built models, other folders)."""
    path = Path(model) / SETTINGS_FILE if isinstance(model, (str, Path)) and Path(model).is_dir() else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


@register_reward("video_exec")
class VideoExecJudge(Reward):
    """ExeVRM-style video execution judge: P(the video carries out the instruction).

    model:      hub id / folder (a Qwen2-VL, Qwen2.5-VL or Qwen3-VL fine-tune such as ExeVRM-8B),
                a built model (+ ``processor``), or a LocalVLM. Default: the shipped tiny judge.
    template:   the question; ``{instruction}`` is replaced by the prompt.
    yes_words / no_words: answer words whose first tokens are read (success / failure).
    pruning:    True (ExeVRM defaults), False/None, a dict of PruningConfig fields or a PruningConfig.
    fps, max_frames, max_pixels: how files are read (judge_files) and what tensor frames mean
                (one frame per 1/fps seconds, for intervals).
    interval:   also return the deviation interval of videos judged failed (greedy continuation).

    Scores in [0, 1] (P(success)); extras: "kept_token_ratio" [B], "visual_tokens" [B],
    "yes_no_mass" [B], and with interval=True "interval_start" / "interval_end" [B] seconds (NaN
    where judged successful or unparsable) and "interval_unparsable" (count).
    """

    name = "video_exec"
    raw_range = (0.0, 1.0)
    modalities = (VIDEO,)

    def __init__(self, model: Any = None, processor: Any = None, *, template: str | None = None,
                 yes_words: Sequence[str] | None = None, no_words: Sequence[str] | None = None,
                 pruning: Any = True, fps: float | None = None, max_frames: int | None = None,
                 max_pixels: int | None = None, interval: bool = False, max_interval_tokens: int = 8,
                 batch_size: int = 4, device=None, dtype=None, name: str = "video_exec"):
        model = SHIPPED_JUDGE_DIR if model is None else model
        if isinstance(model, (str, Path)) and Path(model) == SHIPPED_JUDGE_DIR and not SHIPPED_JUDGE_DIR.is_dir():
            raise FileNotFoundError(f"{name}: no shipped judge at {SHIPPED_JUDGE_DIR}; train one with "
                                    "`align train-exevrm` or pass model=<hub id or folder>")
        settings = judge_settings(model)
        self.vlm = LocalVLM.build(str(model) if isinstance(model, Path) else model, processor,
                                  device=device, dtype=dtype)
        self.name, self.batch_size, self.interval = name, batch_size, interval
        self.template = template or settings.get("template", EXEC_TEMPLATE)
        self.yes_words = list(yes_words or settings.get("yes_words", ["Yes"]))
        self.no_words = list(no_words or settings.get("no_words", ["No"]))
        self.yes_ids = _first_token_ids(self.vlm.tokenizer, self.yes_words)
        self.no_ids = _first_token_ids(self.vlm.tokenizer, self.no_words)
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError(f"{name}: yes words {self.yes_words} and no words {self.no_words} share a first token")
        self.pruning = PruningConfig.build(settings.get("pruning", True) if pruning is True and "pruning" in settings
                                           else pruning)
        self.fps = fps or settings.get("fps", 1.0)
        self.max_frames = max_frames or settings.get("max_frames", 50)
        self.max_pixels = max_pixels or settings.get("max_pixels", 1280 * 720)
        self.max_interval_tokens = max_interval_tokens

    # ---- judging

    def judge(self, videos: Sequence[Any], instructions: Sequence[str], interval: bool | None = None) -> dict:
        """P(success) for each (video, instruction): videos are uint8 [T, H, W, 3] arrays or
        [3, T, H, W] tensors in [0, 1]. Returns {"p_success", "yes_no_mass", "kept_token_ratio",
        "visual_tokens"} ([B] tensors) and, with interval, "intervals" (list of (s, e) | None) and
        "texts" (the continuations)."""
        interval = self.interval if interval is None else interval
        if len(videos) != len(instructions):
            raise ValueError(f"{self.name}: {len(videos)} videos for {len(instructions)} instructions")
        out = {key: [] for key in ("p_success", "yes_no_mass", "kept_token_ratio", "visual_tokens")}
        for start in range(0, len(videos), self.batch_size):
            part = slice(start, start + self.batch_size)
            batch = VideoBatch(self.vlm, self.template, instructions[part], videos[part], self.pruning, self.fps)
            last = (batch.inputs["attention_mask"].sum(1) - 1)[:, None]  # [b, 1]
            with torch.no_grad():
                log_probs = forward_logits(self.vlm.model, batch, last)[:, 0].log_softmax(-1)  # [b, V]
            lse_yes, lse_no = log_probs[:, self.yes_ids].logsumexp(-1), log_probs[:, self.no_ids].logsumexp(-1)
            out["p_success"].append(torch.sigmoid(lse_yes - lse_no).cpu())
            out["yes_no_mass"].append(torch.logaddexp(lse_yes, lse_no).exp().cpu())
            out["kept_token_ratio"].append(batch.kept_ratio)
            out["visual_tokens"].append(batch.visual_tokens.float())
        out = {key: torch.cat(value) for key, value in out.items()}
        if interval:
            out["texts"], out["intervals"] = [], []
            for i, (video, text) in enumerate(zip(videos, instructions)):
                if out["p_success"][i] >= 0.5:
                    out["texts"].append(None)
                    out["intervals"].append(None)
                    continue
                continuation = self.continue_answer(video, text, self.no_words[0])
                out["texts"].append(continuation)
                found = parse_interval(continuation)
                out["intervals"].append(found)
        return out

    @torch.no_grad()
    def continue_answer(self, video: Any, instruction: str, prefix: str) -> str:
        """Greedy continuation of the answer after ``prefix`` (no KV cache: every step is a
        pruned full forward, so rotary positions stay those of the full sequence)."""
        tokenizer = self.vlm.tokenizer
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        generated = prefix
        for _ in range(self.max_interval_tokens):
            batch = VideoBatch(self.vlm, self.template, [instruction], [video], self.pruning, self.fps,
                               answers=[generated])
            last = (batch.prefix_lengths + len(tokenizer(generated, add_special_tokens=False)["input_ids"]) - 1)
            logits = forward_logits(self.vlm.model, batch, last[:, None].to(self.vlm.device))[0, 0]
            token = int(logits.argmax())
            if token in (end, tokenizer.eos_token_id, tokenizer.pad_token_id):
                break
            generated += tokenizer.decode([token])
        return generated[len(prefix):]

    def judge_files(self, paths: Sequence[str | Path], instructions: Sequence[str], interval: bool | None = None) -> dict:
        """Like :meth:`judge`, reading each file with rewards.video_io.read_video at the judge's
        fps / max_frames / max_pixels (errors name the file)."""
        videos = [read_video(p, self.fps, self.max_frames, self.max_pixels).frames for p in paths]
        return self.judge(videos, instructions, interval)

    def score(self, samples, prompts, **kwargs) -> RewardOutput:
        result = self.judge(list(samples), list(prompts))
        extras = {k: result[k] for k in ("yes_no_mass", "kept_token_ratio", "visual_tokens")}
        if "intervals" in result:
            extras["interval_start"] = torch.tensor([math.nan if i is None else i[0] for i in result["intervals"]])
            extras["interval_end"] = torch.tensor([math.nan if i is None else i[1] for i in result["intervals"]])
            extras["interval_unparsable"] = sum(t is not None and i is None
                                                for t, i in zip(result["texts"], result["intervals"]))
        return RewardOutput(result["p_success"], extras)


# ----------------------------------------------------------------------------- training


def _read_rows(rows: Sequence[dict], fps: float, max_frames: int, max_pixels: int, root: Path | None) -> list[dict]:
    """Decode each row's video once (path -> frames)."""
    loaded = []
    for row in rows:
        video = row["video"]
        if isinstance(video, (str, Path)):
            path = Path(video) if root is None or Path(video).is_absolute() else root / video
            video = read_video(path, fps, max_frames, max_pixels).frames
        loaded.append({**row, "video": _even(_to_frames(video))})
    return loaded


def train_video_judge(model, processor, rows: Sequence[dict], *, steps: int = 600, batch_size: int = 8,
                      lr: float = 2e-3, weight_decay: float = 0.01, pruning: Any = True, prune_fraction: float = 0.5,
                      template: str = EXEC_TEMPLATE, interval_weight: float = 1.0, describe_weight: float = 0.0,
                      fps: float = 1.0, max_frames: int = 16, max_pixels: int = 224 * 168,
                      root: str | Path | None = None, seed: int = 0, log_every: int = 50, log=print) -> dict:
    """Fine-tune ``model`` (all parameters) as a video execution judge.

    rows: dicts {video: path | uint8 [T, H, W, 3], instruction, label (1 = success), interval?
    [s, e] seconds, description? (what the video carries out, e.g. "click Save")}. Loss: CE on
    the answer "Yes" / "No s-e" (+ end of turn); the first answer token is the judgement, the
    interval tokens (weight ``interval_weight``) teach temporal attribution. With
    ``describe_weight`` > 0, half of each batch asks ``DESCRIBE_QUESTION`` about a row's video and
    is trained (that weight) on its description: the grounding (which element was acted on, was
    it finished) that a pretrained VLM brings and a judge trained from scratch lacks. A fraction
    ``prune_fraction`` of batches is run with token pruning so the judge works with and without
    it. Returns {"losses", "judgement_losses" (first answer token of the judgement examples),
    "seconds"}.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    data = _read_rows(rows, fps, max_frames, max_pixels, Path(root) if root else None)
    vlm = LocalVLM.build(model, processor)
    config = PruningConfig.build(pruning)
    judged = [(template.replace("{instruction}", r["instruction"]), answer_text(r["label"], r.get("interval")),
               r["video"]) for r in data]
    described = [(DESCRIBE_QUESTION, r["description"], r["video"])
                 for r in data if describe_weight > 0 and r.get("description")]
    if describe_weight > 0 and not described:
        raise ValueError("describe_weight > 0 but no row has a 'description'")
    vlm.model.train().requires_grad_(True)
    with _linear_patch_embedding(vlm.model):
        history = _train_loop(vlm, judged, described, steps, batch_size, lr, weight_decay, config, prune_fraction,
                              interval_weight, describe_weight, fps, rng, log_every, log)
    vlm.model.eval().requires_grad_(False)
    return history


@contextlib.contextmanager
def _linear_patch_embedding(model):
    """Run a Qwen-VL Conv3d patch embedding (kernel = stride = the patch) as the equal matmul:
    CPU conv3d on 14 x 14 x 2 patches is ~10x slower, forward and backward."""
    embed = getattr(getattr(getattr(model, "model", model), "visual", None), "patch_embed", None)
    proj = getattr(embed, "proj", None)
    if not isinstance(proj, torch.nn.Conv3d) or proj.bias is not None:
        yield
        return

    def forward(hidden_states):
        flat = hidden_states.view(-1, proj.weight[0].numel()).to(proj.weight.dtype)
        return flat @ proj.weight.view(proj.weight.shape[0], -1).T

    embed.forward = forward
    try:
        yield
    finally:
        del embed.forward


def _answer_losses(model, batch: VideoBatch) -> tuple[Tensor, Tensor]:
    """Per-token CE of each example's answer: ([B, K] losses, [B, K] valid), position 0 = the first
    answer token."""
    labels = batch.inputs["labels_full"]  # [B, L] answer tokens, -100 elsewhere
    lengths = (labels != -100).sum(1)  # [B]
    width = int(lengths.max())
    first = batch.prefix_lengths.to(labels.device)  # [B] full position of the first answer token
    positions = (first[:, None] + torch.arange(width, device=labels.device)).clamp(max=labels.shape[1] - 1)
    valid = torch.arange(width, device=labels.device)[None] < lengths[:, None]  # [B, K]
    targets = torch.where(valid, labels.gather(1, positions), torch.full_like(positions, -100))
    logits = forward_logits(model, batch, positions - 1)  # [B, K, V]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-100)
    return losses, valid


def _train_loop(vlm, judged, described, steps, batch_size, lr, weight_decay, config, prune_fraction,
                interval_weight, describe_weight, fps, rng, log_every, log) -> dict:
    """AdamW + one-cycle. loss = mean CE of the judgement token + interval_weight x mean CE of the
    other judgement-answer tokens + describe_weight x mean CE of the description tokens."""
    optimizer = torch.optim.AdamW(vlm.model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    n_describe = batch_size // 2 if described else 0
    n_judge = min(batch_size - n_describe, len(judged))
    losses, judgement_losses, start = [], [], time.time()
    for step in track(range(steps), "training the video_exec judge"):
        chunk = [judged[i] for i in rng.choice(len(judged), size=n_judge, replace=False)]
        if n_describe:
            chunk += [described[i] for i in rng.choice(len(described), size=min(n_describe, len(described)),
                                                       replace=False)]
        use = config if (config is not None and rng.random() < prune_fraction) else None
        questions, answers, videos = zip(*chunk)
        batch = VideoBatch(vlm, "{instruction}", questions, videos, use, fps, answers=answers)
        per_token, valid = _answer_losses(vlm.model, batch)  # [B, K]
        judge_part = per_token[:n_judge]
        rest = valid[:n_judge].clone()
        rest[:, 0] = False
        loss = judge_part[:, 0].mean() + interval_weight * (judge_part * rest).sum() / rest.sum().clamp(min=1)
        if n_describe:
            loss = loss + describe_weight * (per_token[n_judge:] * valid[n_judge:]).sum() / valid[n_judge:].sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vlm.model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        judgement_losses.append(float(judge_part[:, 0].detach().mean()))
        if log and (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} "
                f"judgement {np.mean(judgement_losses[-log_every:]):.4f} ({time.time() - start:.0f} s)")
    return {"losses": losses, "judgement_losses": judgement_losses, "seconds": time.time() - start}


def save_judge(model, processor, out: str | Path, settings: dict) -> Path:
    """Write the model, processor and ``video_exec.json`` (judge settings + metrics) to ``out``,
    atomically: into ``<out>.partial``, then swapped in, so a killed save never leaves a broken
    judge where a good one was (``out`` may be the folder the model was loaded from)."""
    from align.checkpoint import replace_dir  # the training tool sits above the reward layer

    out = Path(out)
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model.save_pretrained(work)
    processor.save_pretrained(work)
    (work / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    replace_dir(work, out)
    return out
