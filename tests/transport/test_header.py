"""The message header: shapes and dtypes survive the round trip; what cannot be sent is refused early."""

import pytest
import torch

from lopt_dist.transport import ChannelError, ChannelStats
from lopt_dist.transport.header import decode_header, encode_header, header_length


def test_round_trip_keeps_shapes_dtypes_and_index():
    tensors = [
        torch.zeros(2, 7, 5, dtype=torch.bfloat16),
        torch.zeros(2, 7, dtype=torch.int64),
        torch.zeros(0),
    ]
    header = encode_header(41, "cpu", tensors)
    assert header.shape == (header_length(3),) and header.dtype == torch.int64
    decoded = decode_header(header, 3)
    assert decoded.micro_batch == 41 and decoded.device_type == "cpu"
    assert [(m.dtype, m.shape) for m in decoded.tensors] == [(t.dtype, tuple(t.shape)) for t in tensors]


def test_unsendable_tensors_are_refused():
    with pytest.raises(ChannelError, match="dtype"):
        encode_header(0, "cpu", [torch.zeros(2, dtype=torch.complex64)])
    with pytest.raises(ChannelError, match="dimensions"):
        encode_header(0, "cpu", [torch.zeros(1, 1, 1, 1, 1)])
    with pytest.raises(ChannelError, match="meta"):
        encode_header(0, "meta", [torch.zeros(1)])


def test_a_header_for_other_keys_is_malformed():
    header = encode_header(0, "cpu", [torch.zeros(3)])
    with pytest.raises(ChannelError, match="malformed"):
        decode_header(header, 2)
    with pytest.raises(ChannelError, match="malformed"):
        decode_header(torch.zeros_like(header), 1)


def test_stats_difference_covers_one_interval():
    earlier = ChannelStats(messages=3, bytes=300, blocked_s=0.5)
    later = ChannelStats(messages=7, bytes=1000, blocked_s=1.25)
    assert later.since(earlier) == ChannelStats(messages=4, bytes=700, blocked_s=0.75)
    assert later.snapshot() == later and later.snapshot() is not later
