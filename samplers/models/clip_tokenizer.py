"""An exact OpenAI CLIP BPE tokenizer built offline.

transformers ships no vocabulary files and nothing can be downloaded here, but open_clip's
wheel ships the original CLIP BPE merges (`bpe_simple_vocab_16e6.txt.gz`). The CLIP
vocabulary (49,408 entries) is fully determined by that file: the 256 byte-unicode symbols,
the same symbols with the end-of-word marker `</w>`, one entry per merge (the first 48,894
merges), then `<|startoftext|>` and `<|endoftext|>`.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # CLIP keeps 48,894 merges so the vocabulary is 49,408


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> tuple[str, ...]:
    """GPT-2/CLIP byte -> printable unicode symbol table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return tuple(chr(c) for c in cs)


def _bpe_file() -> Path:
    import open_clip  # the only offline source of the real CLIP merges

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip is installed but its BPE file is missing: {path}")
    return path


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Returns CLIP's (vocab: token -> id, merges: ["a b", ...]) built from open_clip's BPE."""
    lines = gzip.open(_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    symbols = list(_bytes_to_unicode())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(model_max_length: int = 77):
    """A `transformers.CLIPTokenizer` identical to openai/clip-vit-large-patch14's, offline.

    `model_max_length` is the padded/truncated length (77 for real CLIP; the ShapesWorld toy
    uses a shorter context because its captions are short and text tokens cost compute).
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=model_max_length)


def save_clip_tokenizer(directory: str | Path, model_max_length: int = 77) -> Path:
    """Writes vocab.json / merges.txt / tokenizer configs so `CLIPTokenizer.from_pretrained` and
    diffusers pipelines can load the tokenizer from `directory`."""
    build_clip_tokenizer(model_max_length).save_pretrained(str(directory))
    return Path(directory)
