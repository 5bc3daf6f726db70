"""The small int64 header that precedes each message on the activation channel.

Shapes change from micro-batch to micro-batch (the sequence length varies), and a receiver must post a
buffer of the right size before data can land. So every message starts with a header of fixed length
(known to both ends from the payload's keys) saying each tensor's dtype and shape. It also carries the
micro-batch index and the sender's device type, so a routing or ordering mistake fails loudly at the
receiver instead of delivering the wrong activations or hanging on mismatched backends. Evaluation micro-batches,
streamed between training steps, carry negative numbers (`evaluation_micro_batch`).

Layout: [MAGIC, micro_batch, device code, then per key: dtype code, ndim, dims padded with zeros to MAX_NDIM]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAGIC = 0x4C6F5054  # "LoPT": a garbage header (misrouted bytes) is caught before it is trusted
MAX_NDIM = 4
DTYPES = (
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
DEVICE_TYPES = ("cpu", "cuda")
_PREFIX = 3
_PER_KEY = 2 + MAX_NDIM


class ChannelError(RuntimeError):
    """The two ends of a channel disagree (keys, order, device, dtype): a bug in the caller's routing."""


class PeerLostError(RuntimeError):
    """The other end of a boundary went away (its process died, the connection broke) or did not answer in time:
    this worker is the victim of a failure elsewhere, not its cause."""


@dataclass(frozen=True)
class TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Header:
    micro_batch: int
    device_type: str
    tensors: tuple[TensorMeta, ...]  # in the channel's key order


def evaluation_micro_batch(index: int) -> int:
    """The header number of evaluation micro-batch `index` (0, 1, ...): -1, -2, ... Training micro-batches count
    from 0, so a receiver that waits for one never takes an evaluation message in its place, or the reverse."""
    return -1 - index


def header_length(num_keys: int) -> int:
    return _PREFIX + _PER_KEY * num_keys


def encode_header(micro_batch: int, device_type: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """A CPU int64 header for `tensors` (already in key order)."""
    if device_type not in DEVICE_TYPES:
        raise ChannelError(f"activations on {device_type!r} cannot be sent; supported: {DEVICE_TYPES}")
    values = [MAGIC, micro_batch, DEVICE_TYPES.index(device_type)]
    for tensor in tensors:
        if tensor.dtype not in DTYPES:
            raise ChannelError(f"dtype {tensor.dtype} cannot be sent; supported: {DTYPES}")
        if tensor.dim() > MAX_NDIM:
            raise ChannelError(f"at most {MAX_NDIM} dimensions can be sent, got {tensor.dim()}")
        dims = list(tensor.shape) + [0] * (MAX_NDIM - tensor.dim())
        values += [DTYPES.index(tensor.dtype), tensor.dim(), *dims]
    return torch.tensor(values, dtype=torch.int64)


def decode_header(header: torch.Tensor, num_keys: int) -> Header:
    values = header.tolist()
    if len(values) != header_length(num_keys) or values[0] != MAGIC:
        raise ChannelError("malformed header: the two ends disagree on the payload's keys or routing")
    tensors = []
    for k in range(num_keys):
        code, ndim, *dims = values[_PREFIX + k * _PER_KEY : _PREFIX + (k + 1) * _PER_KEY]
        tensors.append(TensorMeta(DTYPES[code], tuple(dims[:ndim])))
    return Header(values[1], DEVICE_TYPES[values[2]], tuple(tensors))
