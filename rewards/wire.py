"""The wire format of `align serve` (rewards/serve.py) and the ``remote`` reward (rewards/remote.py).

Request body: one safetensors file (https://github.com/huggingface/safetensors, format spec in
its README): an 8-byte little-endian header length, a JSON header, then raw tensor bytes.

- one tensor ``"samples"``: ``U8`` pixels 0..255 (the default; a quarter of float32's bytes)
  or ``F32`` in [0, 1] (bit-exact scores of float inputs), shape ``(B, 3, H, W)`` (images) or
  ``(B, 3, T, H, W)`` (videos), channels first as every reward takes them;
- ``__metadata__["genalign"]``: a JSON string ``{"prompts": [str] | null, "metadata": [dict |
  null] | null, "group_ids": [int] | null}``, one entry per sample.

Why safetensors: the header declares dtype and shape before any byte of data, so the server
checks sizes before allocating anything; decoding reads raw bytes and never executes code (object
serialisation formats, Python's own included, run code from the bytes they load); it is already a
dependency. msgpack would need a new dependency and our own tensor framing; base64 PNG in JSON
costs ~1.4x the bytes plus a PNG encode and decode per image.

Response body: JSON ``{"scores": [...], "extras": {name: [...]}, ...}``. JSON has no NaN or
infinity, so floats go through :func:`encode_floats`: finite values as numbers, the others as the
strings "NaN", "Infinity", "-Infinity" (what Python's json module would write unquoted).
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors, save as save_safetensors
from torch import Tensor

__all__ = ["WireError", "DTYPES", "encode_request", "decode_request", "encode_floats", "decode_floats",
           "per_sample_extras"]

# safetensors dtype -> (torch dtype, bytes per element); the only two accepted
DTYPES = {"U8": (torch.uint8, 1), "F32": (torch.float32, 4)}
META_KEY = "genalign"
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class WireError(ValueError):
    """A request the server cannot score: ``status`` (400 malformed, 413 too large, 422 invalid),
    ``problem`` (a short machine-readable name) and a message naming what is wrong."""

    def __init__(self, status: int, problem: str, message: str):
        super().__init__(message)
        self.status, self.problem = status, problem


# ----------------------------------------------------------------------------- floats


def encode_floats(values: Tensor | Sequence[float]) -> list:
    """[N] floats -> a JSON-safe list: finite numbers as is, NaN/inf as "NaN"/"Infinity"/"-Infinity"."""
    values = values.detach().float().cpu().tolist() if isinstance(values, Tensor) else list(values)
    return [v if math.isfinite(v) else ("NaN" if math.isnan(v) else "Infinity" if v > 0 else "-Infinity")
            for v in map(float, values)]


def decode_floats(values: Sequence) -> Tensor:
    """Inverse of :func:`encode_floats` -> float32 [N]; anything else is a ValueError."""
    out = []
    for v in values:
        if isinstance(v, str) and v in _NON_FINITE:
            out.append(_NON_FINITE[v])
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))
        else:
            raise ValueError(f"expected a number or NaN/Infinity/-Infinity, got {v!r}")
    return torch.tensor(out, dtype=torch.float32)


def per_sample_extras(extras: dict, batch: int) -> dict[str, Tensor]:
    """The extras that hold one number per sample (a tensor or array of shape [batch]), as float32
    [batch] tensors. Only these survive server-side batching: they split back per request exactly,
    whereas batch-level values (counts, per-tag means, lists) would describe the merged batch."""
    out = {}
    for key, value in extras.items():
        if isinstance(value, (Tensor, np.ndarray)) and tuple(value.shape) == (batch,):
            try:
                tensor = torch.as_tensor(value).detach()
            except TypeError:  # an object array
                continue
            if not tensor.is_complex():
                out[str(key)] = tensor.float().cpu()
    return out


# ----------------------------------------------------------------------------- request


def encode_request(samples: Tensor, prompts: Sequence[str] | None = None, metadata: Sequence | None = None,
                   group_ids: Sequence[int] | Tensor | None = None, dtype: str = "U8") -> bytes:
    """Request body for samples [B, 3, H, W] or [B, 3, T, H, W] in [0, 1]. ``dtype="U8"`` sends
    ``round(255 * x)`` (what image rewards compute on anyway), ``"F32"`` the floats as they are."""
    if dtype not in DTYPES:
        raise ValueError(f"wire dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    samples = samples.detach().cpu()
    if dtype == "U8":
        samples = (samples.float() * 255).round().clamp(0, 255).to(torch.uint8)
    else:
        samples = samples.float()
    if isinstance(group_ids, Tensor):
        group_ids = group_ids.tolist()
    header = {"prompts": None if prompts is None else list(prompts),
              "metadata": None if metadata is None else list(metadata),
              "group_ids": None if group_ids is None else [int(g) for g in group_ids]}
    return save_safetensors({"samples": samples.contiguous()}, metadata={META_KEY: json.dumps(header, default=_plain)})


def _plain(value):
    """numpy / torch scalars and arrays in metadata -> Python values (json.dumps ``default``)."""
    if isinstance(value, (np.generic, np.ndarray, Tensor)):
        return value.tolist()
    raise TypeError(f"metadata value {value!r} ({type(value).__name__}) cannot be sent as JSON")


def _header(body: bytes) -> tuple[dict, int]:
    if len(body) < 8:
        raise WireError(400, "truncated_body", f"body has {len(body)} bytes, fewer than the 8-byte safetensors "
                                               "header length")
    size = int.from_bytes(body[:8], "little")
    if size > len(body) - 8:
        raise WireError(400, "truncated_body", f"safetensors header declares {size} bytes but the body holds "
                                               f"{len(body) - 8} after the length field")
    try:
        header = json.loads(body[8:8 + size].decode("utf-8"))
    except UnicodeDecodeError as err:
        raise WireError(400, "not_utf8", f"safetensors header is not valid UTF-8 (byte {err.start}); prompts and "
                                         "metadata must be UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise WireError(400, "malformed_header", f"safetensors header is not JSON ({err.msg})") from None
    if not isinstance(header, dict):
        raise WireError(400, "malformed_header", "safetensors header must be a JSON object")
    return header, 8 + size


def _samples_entry(header: dict, data_bytes: int, max_samples: int, max_bytes: int) -> dict:
    names = sorted(k for k in header if k != "__metadata__")
    if names != ["samples"]:
        raise WireError(422, "wrong_tensors", f"expected exactly one tensor named 'samples', got {names}")
    entry = header["samples"]
    if not isinstance(entry, dict):
        raise WireError(400, "malformed_header", "header entry 'samples' must be an object")
    dtype, shape = entry.get("dtype"), entry.get("shape")
    if dtype not in DTYPES:
        raise WireError(422, "wrong_dtype", f"samples dtype {dtype!r} is not accepted: send U8 (pixels 0..255) "
                                            "or F32 (values in [0, 1])")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape)):
        raise WireError(400, "malformed_header", f"samples shape must be a list of non-negative ints, got {shape!r}")
    if len(shape) not in (4, 5) or shape[1] != 3:
        raise WireError(422, "wrong_shape", f"samples shape {shape} is neither images (B, 3, H, W) nor videos "
                                            "(B, 3, T, H, W)")
    if shape[0] == 0:
        raise WireError(422, "empty_batch", "samples has batch size 0: send at least one sample")
    if shape[0] > max_samples:
        raise WireError(413, "batch_too_large", f"{shape[0]} samples in one request, the limit is {max_samples}")
    nbytes = math.prod(shape) * DTYPES[dtype][1]  # Python ints: no overflow, nothing allocated
    if nbytes > max_bytes:
        raise WireError(413, "payload_too_large", f"declared shape {shape} ({dtype}) needs {nbytes} bytes, the "
                                                  f"limit is {max_bytes}")
    if nbytes != data_bytes or entry.get("data_offsets") != [0, nbytes]:
        raise WireError(400, "truncated_body", f"declared shape {shape} ({dtype}) needs {nbytes} bytes, the body "
                                               f"holds {data_bytes} after the header")
    return entry


def _fields(header: dict, batch: int) -> tuple[list | None, list | None, list | None]:
    meta = header.get("__metadata__") or {}
    try:
        fields = json.loads(meta.get(META_KEY, "{}")) if isinstance(meta, dict) else None
    except (TypeError, json.JSONDecodeError):
        fields = None
    if not isinstance(fields, dict):
        raise WireError(400, "malformed_header", f"__metadata__[{META_KEY!r}] must be a JSON object string")
    prompts, metadata, group_ids = fields.get("prompts"), fields.get("metadata"), fields.get("group_ids")
    for key, value in (("prompts", prompts), ("metadata", metadata), ("group_ids", group_ids)):
        if value is not None and (not isinstance(value, list) or len(value) != batch):
            got = f"{len(value)} entries" if isinstance(value, list) else type(value).__name__
            raise WireError(422, f"wrong_{key}", f"{key} must be a list of {batch} entries (one per sample), got {got}")
    if prompts is not None:
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise WireError(422, "wrong_prompts", f"prompt {i} is a {type(prompt).__name__}, not a string")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate escaped in the JSON ("\ud800")
                raise WireError(422, "not_utf8", f"prompt {i} is not valid UTF-8 text (lone surrogate)") from None
    if metadata is not None and not all(m is None or isinstance(m, dict) for m in metadata):
        raise WireError(422, "wrong_metadata", "metadata entries must be JSON objects or null")
    if group_ids is not None and not all(isinstance(g, int) and not isinstance(g, bool) for g in group_ids):
        raise WireError(422, "wrong_group_ids", "group_ids must be integers")
    return prompts, metadata, group_ids


def decode_request(body: bytes, *, max_samples: int, max_bytes: int) -> tuple[Tensor, list | None, list | None,
                                                                                list | None]:
    """(samples, prompts, metadata, group_ids) from a request body; raises :class:`WireError`.

    Checks the header (dtype, shape, batch size, byte count against ``max_bytes``) before the
    tensor is materialised. samples: float32 in [0, 1], [B, 3, H, W] or [B, 3, T, H, W].
    """
    header, data_start = _header(body)
    entry = _samples_entry(header, len(body) - data_start, max_samples, max_bytes)
    prompts, metadata, group_ids = _fields(header, entry["shape"][0])
    try:
        samples = load_safetensors(body)["samples"]
    except (SafetensorError, ValueError) as err:
        raise WireError(400, "malformed_body", f"not a valid safetensors body ({err})") from None
    samples = samples.float() / 255 if samples.dtype == torch.uint8 else samples
    return samples, prompts, metadata, group_ids

