"""Rendezvous stores bound to one address: the TCPStores of the group and boundary process groups.

torch's TCPStore listens on every interface when it opens its own socket. Here the master's worker opens the
socket itself, bound to its node's cluster address (the address Ray reports for the node), and hands the
listening descriptor to the store (`master_listen_fd`). Reserving that socket when the port is chosen also
closes the race in which another process takes a port that was merely seen free.

What this does not bind (torch and NCCL choose those sockets themselves): gloo's connections between ranks
use the address the boundary group is given here (`gloo_device`) but the DeepSpeed groups' gloo (CPU runs)
uses the host name's address or GLOO_SOCKET_IFNAME; NCCL's bootstrap and transport use NCCL_SOCKET_IFNAME.
"""

from __future__ import annotations

import datetime
import socket

import torch.distributed as dist


class Listener:
    """A listening TCP socket on `host` (port 0: any free one), kept open until a store takes it over."""

    def __init__(self, host: str, port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock: socket.socket | None = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.bind((host, port))
            self._sock.listen(128)
        except OSError as err:
            self._sock.close()
            raise OSError(f"cannot listen on {host}: {err}") from err
        self.host = host
        self.port: int = self._sock.getsockname()[1]

    def take_fd(self) -> int:
        """The descriptor, for TCPStore's `master_listen_fd`; the store owns it from now on."""
        if self._sock is None:
            raise RuntimeError(f"the listening socket on port {self.port} was already handed to a store")
        fd, self._sock = self._sock.detach(), None
        return fd

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def make_store(
    host: str,
    port: int,
    world_size: int,
    timeout: datetime.timedelta,
    *,
    is_master: bool,
    listener: Listener | None = None,
) -> dist.TCPStore:
    """The master's store listens through `listener` (bound to `host`); every other rank connects to host:port.

    `is_master` without a listener binds `host:port` now (a port that was only seen free, e.g. in tests)."""
    if listener is not None and listener.port != port:
        raise ValueError(f"the listener holds port {listener.port}, not {port}")
    if is_master and listener is None:
        listener = Listener(host, port)
    fd = listener.take_fd() if is_master else None
    try:
        return dist.TCPStore(host, port, world_size, is_master=is_master, timeout=timeout, master_listen_fd=fd)
    except NotImplementedError:  # torch 2.6: the libuv server takes no listening socket; the classic one does
        return dist.TCPStore(host, port, world_size, is_master=is_master, timeout=timeout, master_listen_fd=fd,
                             use_libuv=False)


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` right now, for single-machine tools and tests; workers reserve a `Listener`."""
    listener = Listener(host)
    listener.close()
    return listener.port
