"""Microbenchmark: milliseconds per message over a boundary group between two Ray actors.

    python -m lopt_dist.transport.bench            # 2.36 MB fp32 payloads (4 x 256 x 576), gloo

Reports the median over a few runs of the sender's wall time per message, with one message in flight at
a time (depth 1) and streaming (depth 4), to compare with shared/notes/activation-transport.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import ray
import torch

from lopt_dist.transport.boundary_group import create_boundary_group, destroy_boundary_group, find_free_port
from lopt_dist.transport.channel import ActivationReceiver, ActivationSender

_KEYS = ("hidden_states",)


@ray.remote(num_cpus=0)
class _BenchPeer:
    def join(self, port: int, rank: int, backend: str) -> None:
        timeout = datetime.timedelta(seconds=60)
        self._device = torch.device("cuda" if backend == "nccl" else "cpu")
        self._group = create_boundary_group("127.0.0.1", port, rank, 2, backend, timeout, name="bench",
                                            device=self._device)

    def send(self, messages: int, depth: int, shape: tuple[int, ...], dtype: torch.dtype) -> float:
        sender = ActivationSender(self._group, _KEYS, depth)
        payload = {"hidden_states": torch.randn(shape).to(dtype=dtype, device=self._device)}
        sender.send(payload, 1, 0)  # warm the connection before timing
        sender.flush()
        start = time.perf_counter()
        for m in range(1, messages + 1):
            sender.send(payload, 1, m)
        sender.flush()
        if self._device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / messages * 1e3

    def recv(self, messages: int) -> None:
        receiver = ActivationReceiver(self._group, _KEYS, self._device)
        for m in range(messages + 1):
            receiver.recv(0, m)

    def leave(self) -> None:
        destroy_boundary_group(self._group)


def bench_ms_per_message(
    shape: tuple[int, ...] = (4, 256, 576),
    dtype: torch.dtype = torch.float32,
    messages: int = 50,
    depths: tuple[int, ...] = (1, 4),
    repeats: int = 5,
    backend: str = "gloo",
) -> dict[int, float]:
    """Median ms per message for each depth; starts a local Ray unless one is running."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # NCCL cannot connect two processes on one GPU, so an NCCL run needs two.
    gpus = 1 if backend == "nccl" else 0
    peers = [_BenchPeer.options(num_gpus=gpus).remote() for _ in range(2)]
    port = find_free_port()
    ray.get([p.join.remote(port, rank, backend) for rank, p in enumerate(peers)])
    medians = {}
    for depth in depths:
        runs = []
        for _ in range(repeats):
            receiving = peers[1].recv.remote(messages)
            runs.append(ray.get(peers[0].send.remote(messages, depth, shape, dtype)))
            ray.get(receiving)
        medians[depth] = statistics.median(runs)
    ray.get([p.leave.remote() for p in peers])
    for p in peers:
        ray.kill(p)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 256, 576])
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    args = parser.parse_args()
    megabytes = torch.Size(args.shape).numel() * 4 / 1e6
    result = bench_ms_per_message(
        tuple(args.shape), messages=args.messages, repeats=args.repeats, backend=args.backend
    )
    for depth, ms in result.items():
        print(f"{megabytes:.2f} MB fp32, {args.backend}, depth {depth}: {ms:.2f} ms per message (median)")


if __name__ == "__main__":
    main()
