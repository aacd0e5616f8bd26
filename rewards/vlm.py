"""VLM-based rewards: PromptEcho, a yes/no judge, an artefact guard and FIRM critics.

Every reward here runs a frozen vision-language model through :class:`LocalVLM`, which wraps
any transformers model + processor pair whose processor has a chat template (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL, LLaVA, ...: whatever ``AutoModelForImageTextToText`` and
``AutoProcessor`` load). Pass a hub id or a local folder (``model="Qwen/Qwen2.5-VL-7B-Instruct"``),
ready-built ``model=`` and ``processor=`` objects, or a LocalVLM to share one model between
several rewards.

- "prompt_echo" (:class:`PromptEcho`): -CE of the prompt as the answer to "Describe this
  image in detail.", teacher-forced, one forward pass.
- "vlm_yes_no" (:class:`YesNoJudge`): P("Yes") / (P("Yes") + P("No")) for a question about
  the prompt (VQAScore), optionally against a reference image (RewardDance style).
- "artifact_guard" (:class:`ArtifactGuard`): 1 - P(yes | "does this image have artefacts?").
- "firm_critic" (:class:`FirmCritic`): a generated 1-5 critique score (execution,
  consistency, instruction following, quality) asked with FIRM's released prompts
  (rewards/prompts/firm.py) or genalign's own wording, parsed by :func:`parse_scores`
  (FIRM's list answers included); combine two critics with ``base_and_bonus`` (rewards/compose.py).

Generation goes through one seam, ``generate_fn(conversations) -> list[str | None]``, so a
remote backend can replace the local model: ``LocalVLM.generate`` is one, and so is
``rewards.http.ChatCompletionsClient(...).generate`` (an OpenAI-compatible vLLM/SGLang
endpoint). FirmCritic's conversations are OpenAI chat messages with PNG data URLs::

    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
                                  {"type": "text", "text": "..."}]}]

(LocalVLM also takes transformers-style ``{"type": "image", "image": <PIL.Image>}`` parts, which
the forward-only rewards use.)

Images only ([B, 3, H, W] in [0, 1], quantised to 8-bit PIL images for the processor); none of
these rewards is differentiable.
"""

from __future__ import annotations

import base64
import inspect
import io
import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from rewards.base import IMAGE, Reward, RewardOutput, register_reward
from rewards.http import image_part
from rewards.parsing import parse_score, parse_scores
from rewards.shapes import to_uint8_images

__all__ = [
    "LocalVLM",
    "logits_at",
    "byte_tokenizer",
    "PromptEcho",
    "YesNoJudge",
    "ArtifactGuard",
    "FirmCritic",
    "parse_score",
    "parse_scores",
    "to_pil_images",
    "user_turn",
]

Conversation = list[dict]
GenerateFn = Callable[[list[Conversation]], list]  # -> list[str | None], None = request failed

DESCRIBE_QUERY = "Describe this image in detail."
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's chat format for text and images, without the default system turn (for the tiny VLMs built offline).
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>{{ '\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\n' }}{% endif %}"
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- inputs


def byte_tokenizer(special_tokens: Sequence[str] = QWEN_SPECIALS, words_from: Sequence[str] = ()):
    """A ``Qwen2Tokenizer`` for the tiny VLMs built offline: byte-level BPE over the 256 byte
    symbols, ``special_tokens`` (the first is eos / pad / unk) and one merge chain per word of
    ``words_from``.

    Without ``words_from`` there are no merges and every UTF-8 byte is one token. A word's chain
    merges its bytes left to right ("Ġ"+"r", "Ġr"+"e", "Ġre"+"d"), so the word becomes one token
    as it appears in ``words_from`` (with its leading space or without); text outside the
    vocabulary still tokenises, byte by byte.
    """
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for text in words_from:
        for word, _ in splitter.pre_tokenize_str(text):
            piece = word[0]
            for char in word[1:]:
                if piece + char not in vocab:
                    vocab[piece + char] = len(vocab)
                    merges.append((piece, char))
                piece += char
    for token in special_tokens:
        vocab[token] = len(vocab)
    first = special_tokens[0]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token=first, pad_token=first, unk_token=first)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens[1:])})
    return tokenizer


def append_continuations(prefix: dict, continuations: Sequence[Sequence[int]], pad_id: int) -> tuple[dict, Tensor]:
    """Teacher-forcing inputs: each row of a right-padded processor encoding ``prefix`` with the
    token ids of its continuation appended right after its real tokens (padding moves to the end).

    Per-token integer inputs (input_ids, attention_mask, mm_token_type_ids, ...) are re-laid out;
    everything else (pixel values, grids) is kept. Returns (inputs, prefix lengths [B]).
    """
    keep = prefix["attention_mask"].bool()  # [B, L0]
    lengths = keep.sum(1).cpu()  # [B]
    batch, device = len(continuations), keep.device
    width = int(max(int(n) + len(c) for n, c in zip(lengths, continuations)))
    per_token = [k for k, v in prefix.items() if not v.is_floating_point() and v.shape == keep.shape]
    inputs = {k: v for k, v in prefix.items() if k not in per_token}
    for key in per_token:
        inputs[key] = torch.zeros(batch, width, dtype=prefix[key].dtype, device=device)
    inputs["input_ids"].fill_(pad_id)
    for i, continuation in enumerate(continuations):
        start, stop = int(lengths[i]), int(lengths[i]) + len(continuation)
        for key in per_token:
            inputs[key][i, :start] = prefix[key][i][keep[i]]
        inputs["input_ids"][i, start:stop] = torch.as_tensor(continuation, dtype=torch.long, device=device)
        inputs["attention_mask"][i, start:stop] = 1
    return inputs, lengths


def to_pil_images(samples: Tensor) -> list:
    """[B, 3, H, W] floats in [0, 1] -> B RGB PIL images (8-bit, what VLM processors expect)."""
    from PIL import Image

    return [Image.fromarray(array) for array in to_uint8_images(samples)]


def user_turn(images: Sequence[Any], text: str) -> Conversation:
    """A one-turn conversation: the images (in order), then the text."""
    content = [{"type": "image", "image": image} for image in images]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


def _decode_data_url(url: str):
    from PIL import Image

    if not url.startswith("data:image/"):
        raise ValueError(f"LocalVLM reads images from PIL objects or base64 data URLs, got {url[:40]!r}...")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def _local_format(conversation: Conversation) -> tuple[Conversation, list]:
    """OpenAI ``image_url`` data-URL parts -> transformers ``{"type": "image"}`` parts; the images."""
    turns, images = [], []
    for turn in conversation:
        if isinstance(turn["content"], str):
            turns.append(turn)
            continue
        content = []
        for part in turn["content"]:
            if part.get("type") == "image_url":
                part = {"type": "image", "image": _decode_data_url(part["image_url"]["url"])}
            if part.get("type") == "image":
                images.append(part["image"])
            content.append(part)
        turns.append({**turn, "content": content})
    return turns, images


def _check_images(images: Any, batch: int, what: str) -> None:
    """Extra per-sample images (references, edit sources) get the same checks as samples."""
    checker = Reward()
    checker.name, checker.modalities, checker.requires_prompts = what, (IMAGE,), False
    checker.validate(images)
    if images.shape[0] != batch:
        raise ValueError(f"{what}: got {images.shape[0]} images for {batch} samples")


def _fill(template: str, prompt: str | None) -> str:
    # str.replace, not str.format: templates contain literal JSON braces.
    return template if prompt is None else template.replace("{prompt}", prompt)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, 'auto' or a torch.dtype, got {dtype!r}")
    return DTYPES[dtype]


def logits_at(model: Any, inputs: dict, positions: Tensor) -> Tensor:
    """Float32 logits [B, K, V] of ``model(**inputs)`` at token positions [B, K], row b at its own
    positions[b], whatever the transformers version.

    A model whose forward takes ``logits_to_keep`` projects only the positions some row needs:
    their union goes in as a 1-D tensor, which every version keeps for every row ([B, U, V]), and
    each row then picks its own. (A 2-D tensor is read per row only from transformers 5.21 on;
    earlier heads index ``hidden[:, positions]`` and return [B, B, K, V].) Other models, or an
    output of any other shape, use the full logits [B, L, V].
    """
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        keep, index = torch.unique(positions, return_inverse=True)  # [U] sorted, [B, K] into keep
        logits = model(**inputs, logits_to_keep=keep).logits
        if logits.shape[:2] == (positions.shape[0], keep.numel()) and logits.ndim == 3:
            return torch.take_along_dim(logits, index[..., None], dim=1).float()
    logits = model(**inputs).logits  # [B, L, V]
    return torch.take_along_dim(logits, positions[..., None], dim=1).float()


# ----------------------------------------------------------------------------- local model


class LocalVLM:
    """A frozen transformers VLM and its processor: teacher-forced scoring and generation.

    model:     a hub id / local folder (loaded with ``AutoModelForImageTextToText`` and
               ``AutoProcessor``), or a built model (then ``processor`` is required).
    device:    default CUDA if available, else CPU; a built model is moved only if given.
    dtype:     "fp32" | "bf16" | "fp16" | torch.dtype; for a path the default is bf16 on
               CUDA and fp32 on CPU; a built model keeps its dtype unless one is given.
    max_new_tokens: default length of :meth:`generate` (greedy decoding).

    Right padding is used for scoring (so position ids never depend on batch padding) and left
    padding for generation.
    """

    def __init__(self, model: Any, processor: Any = None, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, max_new_tokens: int = 512, **load_kwargs):
        if isinstance(model, str) or hasattr(model, "__fspath__"):
            from transformers import AutoModelForImageTextToText, AutoProcessor

            path, target = str(model), _resolve_device(device)
            model = AutoModelForImageTextToText.from_pretrained(
                path, dtype=_resolve_dtype(dtype, target), **load_kwargs)
            model = model if "device_map" in load_kwargs else model.to(target)  # accelerate placed it
            processor = processor if processor is not None else AutoProcessor.from_pretrained(path)
        elif processor is None:
            raise ValueError("LocalVLM: a built model needs its processor (processor=...)")
        else:
            target = _resolve_device(device) if device is not None else next(model.parameters()).device
            model = model.to(target) if dtype is None else model.to(target, _resolve_dtype(dtype, target))
        if getattr(processor, "chat_template", None) is None:
            raise ValueError(f"LocalVLM: processor {type(processor).__name__} has no chat template")
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_new_tokens = max_new_tokens

    @classmethod
    def build(cls, model: Any, processor: Any = None, **kwargs) -> "LocalVLM":
        """``model`` as a LocalVLM: a LocalVLM is returned as is (sharing one model), else loaded."""
        if isinstance(model, LocalVLM):
            if processor is not None or any(v is not None for v in kwargs.values()):
                raise ValueError("a ready LocalVLM takes no processor / device / dtype arguments")
            return model
        return cls(model, processor, **{k: v for k, v in kwargs.items() if v is not None})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode(self, conversations: Sequence[Conversation], padding_side: str = "right"):
        """Processor inputs (on the model's device) for the conversations + generation prompt.

        Images may be PIL images in ``{"type": "image", "image": ...}`` parts or base64 data URLs
        in OpenAI ``image_url`` parts (what :meth:`generate` receives from FirmCritic).
        """
        conversations, images = zip(*(_local_format(c) for c in conversations))
        texts = [self.processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                 for c in conversations]
        inputs = self.processor(text=texts, images=images if any(images) else None, padding=True,
                                padding_side=padding_side, return_tensors="pt")
        return {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in inputs.items()}

    @torch.no_grad()
    def logits_at(self, inputs: dict, positions: Tensor) -> Tensor:
        """Float32 next-token logits [B, K, V] at token positions [B, K] (see :func:`logits_at`)."""
        return logits_at(self.model, inputs, positions.to(self.device))

    def next_token_logits(self, conversations: Sequence[Conversation]) -> Tensor:
        """Logits [B, V] of the first answer token."""
        inputs = self.encode(conversations)
        mask = inputs["attention_mask"]  # [B, L]
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)  # [B] last real token
        return self.logits_at(inputs, last[:, None])[:, 0]

    def continuation_log_probs(self, conversations: Sequence[Conversation],
                               continuations: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Teacher-forced log p(continuation tokens | conversation + generation prompt).

        Returns (log_probs [B, T], mask [B, T]); T = longest continuation in tokens, mask is 1 on
        real tokens. The continuation is tokenised on its own (no special tokens) and appended
        after the generation prompt, so its tokens are exactly the prompt's tokens.
        """
        targets = [torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
                   for text in continuations]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        inputs, prefix_len = append_continuations(self.encode(conversations), targets, pad_id)
        count = torch.tensor([len(t) for t in targets])  # [B]
        width, longest = inputs["input_ids"].shape[1], max(1, int(count.max()))
        target_ids = torch.full((len(targets), longest), pad_id, dtype=torch.long)  # [B, T]
        for i, target in enumerate(targets):
            target_ids[i, : len(target)] = target
        # Token t of the continuation is predicted at position prefix_len - 1 + t.
        positions = (prefix_len[:, None] - 1 + torch.arange(longest)).clamp(max=width - 1)  # [B, T]
        log_probs = self.logits_at(inputs, positions).log_softmax(-1)  # [B, T, V]
        token_log_probs = log_probs.gather(-1, target_ids.to(self.device)[..., None])[..., 0]  # [B, T]
        mask = (torch.arange(longest) < count[:, None]).to(self.device)  # [B, T]
        return token_log_probs.masked_fill(~mask, 0.0), mask

    @torch.no_grad()
    def generate(self, conversations: Sequence[Conversation], max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers, one string per conversation (the ``generate_fn`` signature)."""
        inputs = self.encode(conversations, padding_side="left")
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens or self.max_new_tokens,
                                     do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        answers = output[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(answers, skip_special_tokens=True)


# ----------------------------------------------------------------------------- rewards


class _VLMReward(Reward):
    """Shared set-up: a LocalVLM, images only, scored in chunks of ``batch_size``."""

    modalities = (IMAGE,)

    def __init__(self, model, processor=None, *, device=None, dtype=None, batch_size: int = 8, name: str):
        if batch_size < 1:
            raise ValueError(f"{name}: batch_size must be >= 1, got {batch_size}")
        self.vlm = LocalVLM.build(model, processor, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.name = name

    def _chunks(self, size: int) -> list[slice]:
        return [slice(i, min(i + self.batch_size, size)) for i in range(0, size, self.batch_size)]


@register_reward("prompt_echo")
class PromptEcho(_VLMReward):
    """PromptEcho: how well a frozen VLM "echoes" the prompt when asked to describe the image.

    score = -CE(prompt tokens | image, query), teacher-forced in the model's chat format (the
    prompt is the assistant's answer to ``query``, default "Describe this image in detail.").
    One forward pass, no generation.

    Scale: ``reduction="mean"`` (default) gives minus the mean negative log-likelihood per
    prompt token, in nats, raw range (-inf, 0]; ``"sum"`` gives minus the total over the
    prompt's tokens (longer prompts score lower: compare only within one prompt). The paper's
    advantages are group-centred without std division. An empty prompt scores NaN.
    extras: "num_tokens" [B], "nll_sum" [B].
    """

    raw_range = (-math.inf, 0.0)

    def __init__(self, model, processor=None, *, query: str = DESCRIBE_QUERY, reduction: str = "mean",
                 device=None, dtype=None, batch_size: int = 8, name: str = "prompt_echo"):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"{name}: reduction must be 'mean' or 'sum', got {reduction!r}")
        super().__init__(model, processor, device=device, dtype=dtype, batch_size=batch_size, name=name)
        self.query, self.reduction = query, reduction

    def score(self, samples, prompts, **kwargs) -> RewardOutput:
        images = to_pil_images(samples)
        nll, count = torch.empty(len(images)), torch.empty(len(images))
        for part in self._chunks(len(images)):
            log_probs, mask = self.vlm.continuation_log_probs(
                [user_turn([image], self.query) for image in images[part]], prompts[part])
            nll[part], count[part] = -log_probs.sum(1).cpu(), mask.sum(1).cpu()
        scores = -nll / count if self.reduction == "mean" else -nll
        scores = torch.where(count > 0, scores, torch.full_like(scores, math.nan))
        return RewardOutput(scores, {"num_tokens": count, "nll_sum": nll})


VQASCORE_TEMPLATE = 'Does this figure show "{prompt}"? Please answer yes or no.'
REFERENCE_TEMPLATE = (
    'Both images were generated for the prompt "{prompt}". The first image is a reference. '
    "Is the second image better than the reference, both in following the prompt and in visual "
    "quality? Please answer yes or no."
)
ARTIFACT_TEMPLATE = (
    "Does this image have visual artefacts that look unintentional, such as distorted or malformed "
    "objects, broken shapes, unnatural textures or patterns, noise, smears or blur? "
    "Please answer yes or no."
)


def _first_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    # The answer's first token decides; for Qwen / LLaVA tokenizers "Yes" and "No" are one token.
    return sorted({tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in words})


@register_reward("vlm_yes_no")
class YesNoJudge(_VLMReward):
    """Yes/no probability judge (VQAScore; RewardDance with a reference image).

    Asks ``template`` (``{prompt}`` is replaced by the prompt) about the image and reads the
    first answer token's logits: score = P(yes) / (P(yes) + P(no)) = sigmoid(lse_yes - lse_no),
    where lse_yes is the log-sum-exp of the logits of the first tokens of ``yes_words`` (and
    likewise for no). Raw range [0, 1], 0.5 = undecided.

    With ``references=`` ([B, 3, H, W] in [0, 1], per sample) at call time, the reference image
    goes first and the question is ``reference_template`` (default: is the second image better
    than the reference?), RewardDance's comparative judgement.
    extras: "yes_no_mass" [B] = P(yes) + P(no) unnormalised (low values mean the model is not
    answering yes/no: the score is then unreliable).
    """

    raw_range = (0.0, 1.0)

    def __init__(self, model, processor=None, *, template: str = VQASCORE_TEMPLATE,
                 reference_template: str = REFERENCE_TEMPLATE, yes_words: Sequence[str] = ("Yes",),
                 no_words: Sequence[str] = ("No",), device=None, dtype=None, batch_size: int = 8,
                 name: str = "vlm_yes_no"):
        super().__init__(model, processor, device=device, dtype=dtype, batch_size=batch_size, name=name)
        self.template, self.reference_template = template, reference_template
        self.yes_ids = _first_token_ids(self.vlm.tokenizer, yes_words)
        self.no_ids = _first_token_ids(self.vlm.tokenizer, no_words)
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError(f"{name}: yes words {list(yes_words)} and no words {list(no_words)} "
                             "share a first token")

    def probability_yes(self, conversations: Sequence[Conversation]) -> tuple[Tensor, Tensor]:
        """(P(yes) / (P(yes) + P(no)) [B], P(yes) + P(no) [B]) of the first answer token."""
        p_yes, mass = [], []
        for part in self._chunks(len(conversations)):
            log_probs = self.vlm.next_token_logits(conversations[part]).log_softmax(-1)  # [b, V]
            lse_yes = log_probs[:, self.yes_ids].logsumexp(-1)  # [b]
            lse_no = log_probs[:, self.no_ids].logsumexp(-1)  # [b]
            p_yes.append(torch.sigmoid(lse_yes - lse_no).cpu())
            mass.append(torch.logaddexp(lse_yes, lse_no).exp().cpu())
        return torch.cat(p_yes), torch.cat(mass)

    def score(self, samples, prompts, references: Tensor | None = None, **kwargs) -> RewardOutput:
        images = to_pil_images(samples)
        if references is None:
            conversations = [user_turn([image], _fill(self.template, prompt))
                             for image, prompt in zip(images, prompts)]
        else:
            _check_images(references, samples.shape[0], f"{self.name} references=")
            conversations = [user_turn([ref, image], _fill(self.reference_template, prompt))
                             for ref, image, prompt in zip(to_pil_images(references), images, prompts)]
        p_yes, mass = self.probability_yes(conversations)
        return RewardOutput(p_yes, {"yes_no_mass": mass})


@register_reward("artifact_guard")
class ArtifactGuard(YesNoJudge):
    """Prompt-free artefact guard ("Understanding Reward Hacking in T2I RL"): reward = 1 - P(yes).

    P(yes) = sigmoid(lse_yes - lse_no) for "does this image have unintentional artefacts?"
    (``template``; our own wording, not the paper's optimised prompt). Raw range [0, 1], 1 = no
    artefacts. The paper adds it to the task reward before group normalisation
    (``weighted_sum``). extras: "p_artifact" [B], "yes_no_mass" [B].
    """

    requires_prompts = False

    def __init__(self, model, processor=None, *, template: str = ARTIFACT_TEMPLATE,
                 yes_words: Sequence[str] = ("Yes",), no_words: Sequence[str] = ("No",),
                 device=None, dtype=None, batch_size: int = 8, name: str = "artifact_guard"):
        super().__init__(model, processor, template=template, yes_words=yes_words, no_words=no_words,
                         device=device, dtype=dtype, batch_size=batch_size, name=name)

    def score(self, samples, prompts=None, **kwargs) -> RewardOutput:
        prompts = prompts if prompts is not None else [None] * samples.shape[0]
        conversations = [user_turn([image], _fill(self.template, prompt))
                         for image, prompt in zip(to_pil_images(samples), prompts)]
        p_artifact, mass = self.probability_yes(conversations)
        return RewardOutput(1 - p_artifact, {"p_artifact": p_artifact, "yes_no_mass": mass})


# ----------------------------------------------------------------------------- FIRM critics

_ANSWER_FORMAT = (
    "\n\nThink briefly, then give your answer as JSON on the last line, exactly in this form: {format}"
)
# genalign's own wording of the four critics (prompts="genalign"); FIRM's released prompts are in
# rewards/prompts/firm.py (prompts="firm", the default).
GENALIGN_TEMPLATES = {
    "execution": (
        "The first image is the original, the second is the result of editing it with the instruction: "
        '"{prompt}".\nRate the EXECUTION of the edit from 1 to 5: are all requested changes present '
        "and correct?\n5 = every requested change is present and correct; 4 = all present, one is "
        "slightly off; 3 = some requested changes are missing or wrong; 2 = most are missing or wrong; "
        "1 = the edit was not carried out."
    ),
    "consistency": (
        "The first image is the original, the second is the result of editing it with the instruction: "
        '"{prompt}".\nRate CONSISTENCY from 1 to 5: count the UNINTENDED changes (anything the '
        "instruction did not ask to change), ignoring the requested ones.\n5 = no unintended change; "
        "4 = one significant or 1-2 minor unintended changes; 3 = 2-3 significant or 3-4 minor; "
        "2 = 4 or more significant or 5 or more minor; 1 = the image is almost entirely different."
    ),
    "instruction": (
        'The image was generated for the prompt: "{prompt}".\nRate INSTRUCTION FOLLOWING from 1 to 5. '
        "List every requirement of the prompt (objects, counts, attributes, colours, positions, "
        "relations, text, style) and check each one against the image.\n5 = every requirement is met; "
        "4 = one minor requirement is missed; 3 = several minor or one major requirement missed; "
        "2 = most requirements missed; 1 = the image is unrelated to the prompt."
    ),
    "quality": (
        "Rate the image from 1 to 5 on each of three aspects, independently of any prompt:\n"
        "aesthetics: composition, lighting, colour harmony;\n"
        "quality: technical quality, free of noise, blur, compression or over-saturation;\n"
        "structure: plausible structure and texture, free of malformed objects, broken anatomy "
        "or artefacts.\n5 = excellent, 3 = acceptable with visible flaws, 1 = very poor."
    ),
}
QUALITY_SUB_SCORES = ("aesthetics", "quality", "structure")  # the order of FIRM's "score" list
EDIT_CRITICS = ("execution", "consistency")
# FIRM's generation caps: editing/reward_server (256), generation/flow_grpo/reward_model_server (8192).
FIRM_MAX_NEW_TOKENS = {"execution": 256, "consistency": 256, "instruction": 8192, "quality": 8192}
QUALITY_REDUCTIONS = ("min", "mean")


@register_reward("firm_critic")
class FirmCritic(Reward):
    """FIRM critic ("Trust Your Critic"): a generated 1-5 judgement, parsed.

    critic:  "execution" / "consistency" (editing: the source image goes first, pass
             ``source_images=[B, 3, H, W]`` at call time; prompts are edit instructions),
             "instruction" (generation: requirement-by-requirement prompt following) or
             "quality" (generation, prompt-free: aesthetics, quality, structure sub-scores).
    prompts: "firm" (default): FIRM's released prompts (rewards/prompts/firm.py, from
             VisionXLab/FIRM-Reward), the ones FIRM-Edit-8B / FIRM-Gen-8B were trained on, with
             their answer formats: ``"score" : [N]`` (editing), ``\\boxed{N}`` after a
             requirement-by-requirement analysis (instruction), ``"score" : [a, b, c]`` (quality).
             "genalign": genalign's own shorter wording, asking for JSON with named keys.
    template: replaces the critic's prompt (``{prompt}`` and ``{requirement}`` are filled); with
             prompts="genalign" the JSON answer format is appended, with "firm" it is used as is.
    reduce:  how the quality critic's three sub-scores become its score: "min" (default; FIRM's
             QMA reward, generation/flow_grpo/reward_model_server.py) or "mean" (FIRM's legacy
             total, their sum, on the 1-5 scale).
    Backend: ``model`` (+ ``processor``) loads or wraps a local VLM (greedy decoding, up to
    ``max_new_tokens``, default FIRM's caps: 256 editing, 8192 generation), or
    ``generate_fn(conversations) -> list[str]`` is any other backend (e.g.
    ``rewards.http.ChatCompletionsClient(...).generate``); give exactly one.
    Call-time ``requirements=[str] * B`` fills FIRM-Gen's "Additional Requirement" (default empty).

    Parsing (:func:`rewards.parsing.parse_scores`): a number, a one-element list (a longer list:
    its first number, as FIRM's servers read it), ``\\boxed{N}`` or ``Final Alignment Rating: N``;
    the quality critic needs exactly three sub-scores (FIRM's list, or the named keys of the
    genalign wording). Raw range [1, 5] (FIRM-Gen / FIRM-Edit scale): normalise with
    (s - 1) / 4, as ``base_and_bonus`` does (QMA: R = I (0.4 + 0.6 Q); CME: R = E (0.6 + 0.4 C)).
    An answer with no parsable score, one outside [1, 5], or none at all (a failed request: None)
    scores NaN and is counted.
    extras: "texts" (the raw answers), "no_answer", "unparsable" and "out_of_range" (counts) and, for
    "quality", the sub-scores [B] by name.
    """

    raw_range = (1.0, 5.0)
    modalities = (IMAGE,)

    def __init__(self, critic: str = "instruction", model: Any = None, processor: Any = None, *,
                 generate_fn: GenerateFn | None = None, prompts: str = "firm", template: str | None = None,
                 reduce: str = "min", max_new_tokens: int | None = None, device=None, dtype=None,
                 batch_size: int = 8, name: str = "firm_critic"):
        from rewards.prompts.firm import FIRM_PROMPTS

        if critic not in FIRM_PROMPTS:
            raise ValueError(f"{name}: critic must be one of {sorted(FIRM_PROMPTS)}, got {critic!r}")
        if prompts not in ("firm", "genalign"):
            raise ValueError(f"{name}: prompts must be 'firm' or 'genalign', got {prompts!r}")
        if reduce not in QUALITY_REDUCTIONS:
            raise ValueError(f"{name}: reduce must be one of {list(QUALITY_REDUCTIONS)}, got {reduce!r}")
        if (model is None) == (generate_fn is None):
            raise ValueError(f"{name}: give exactly one of model= (a local VLM) or generate_fn=")
        if batch_size < 1:
            raise ValueError(f"{name}: batch_size must be >= 1, got {batch_size}")
        self.critic, self.prompts, self.reduce, self.name, self.batch_size = critic, prompts, reduce, name, batch_size
        self.sub_scores = QUALITY_SUB_SCORES if critic == "quality" else ("score",)
        self.requires_prompts = critic != "quality"
        if prompts == "firm":
            self.template = template or FIRM_PROMPTS[critic]
        else:
            answer = "{" + ", ".join(f'"{k}": <1-5>' for k in self.sub_scores) + "}"
            self.template = (template or GENALIGN_TEMPLATES[critic]) + _ANSWER_FORMAT.replace("{format}", answer)
        if generate_fn is None:
            vlm = LocalVLM.build(model, processor, device=device, dtype=dtype)
            tokens = max_new_tokens or FIRM_MAX_NEW_TOKENS[critic]
            generate_fn = lambda conversations: vlm.generate(conversations, tokens)  # noqa: E731
        self.generate_fn = generate_fn

    def conversations(self, samples: Tensor, prompts: Sequence[str] | None, source_images: Tensor | None = None,
                      requirements: Sequence[str] | None = None) -> list[Conversation]:
        """The critic's OpenAI-format chat messages for a batch (what ``generate_fn`` receives)."""
        images = [[image] for image in to_uint8_images(samples)]
        if self.critic in EDIT_CRITICS:
            if source_images is None:
                raise ValueError(f"{self.name}: the {self.critic} critic compares with the source image: "
                                 "pass source_images=[B, 3, H, W]")
            _check_images(source_images, samples.shape[0], f"{self.name} source_images=")
            images = [[source, *edited] for source, edited in zip(to_uint8_images(source_images), images)]
        prompts = prompts if prompts is not None else [None] * len(images)
        requirements = requirements if requirements is not None else [""] * len(images)
        if len(requirements) != len(images):
            raise ValueError(f"{self.name}: got {len(requirements)} requirements for {len(images)} samples")
        texts = [_fill(self.template, prompt).replace("{requirement}", requirement)
                 for prompt, requirement in zip(prompts, requirements)]
        return [[{"role": "user", "content": [image_part(image) for image in pair] + [{"type": "text", "text": text}]}]
                for pair, text in zip(images, texts)]

    def sub_scores_of(self, text: str | None) -> list[float] | None:
        """The critic's sub-scores in ``text`` (one for single-score critics), or None."""
        if self.critic != "quality":
            score = parse_score(text, "score", reduce="first")
            return None if score is None else [score]
        if self.prompts == "firm":
            values = parse_scores(text, "score")
            return values if values is not None and len(values) == len(QUALITY_SUB_SCORES) else None
        values = [parse_score(text, key) for key in QUALITY_SUB_SCORES]
        return None if None in values else values

    def score(self, samples, prompts, source_images: Tensor | None = None,
              requirements: Sequence[str] | None = None, **kwargs) -> RewardOutput:
        conversations = self.conversations(samples, prompts, source_images, requirements)
        texts: list[str | None] = []
        for start in range(0, len(conversations), self.batch_size):
            chunk = conversations[start:start + self.batch_size]
            answers = list(self.generate_fn(chunk))
            if len(answers) != len(chunk):
                raise ValueError(f"{self.name}: generate_fn returned {len(answers)} answers for {len(chunk)} inputs")
            texts += answers
        low, high = self.raw_range
        subs = torch.full((len(self.sub_scores), len(texts)), math.nan)  # [S, B]
        no_answer = unparsable = out_of_range = 0
        for i, text in enumerate(texts):
            values = self.sub_scores_of(text)
            if text is None:
                no_answer += 1
            elif values is None:
                unparsable += 1
            elif any(not low <= v <= high for v in values):
                out_of_range += 1
            else:
                subs[:, i] = torch.tensor(values)
        scores = subs.mean(0) if self.reduce == "mean" else subs.amin(0)  # [B]; NaN if any sub-score is NaN
        extras = {"texts": texts, "no_answer": no_answer, "unparsable": unparsable, "out_of_range": out_of_range}
        if self.critic == "quality":
            extras.update(dict(zip(self.sub_scores, subs)))
        return RewardOutput(scores, extras)
