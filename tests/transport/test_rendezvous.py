"""Rendezvous stores: the master's store listens through the socket its worker reserved, taken over once."""

from __future__ import annotations

import datetime

import pytest

from lopt_dist.transport.rendezvous import Listener, make_store


def test_rendezvous_listener_hands_its_socket_over_once():
    listener = Listener("127.0.0.1")
    with pytest.raises(ValueError, match=f"holds port {listener.port}"):
        make_store("127.0.0.1", listener.port + 1, 1, datetime.timedelta(seconds=5), is_master=True,
                   listener=listener)
    store = make_store("127.0.0.1", listener.port, 1, datetime.timedelta(seconds=5), is_master=True,
                       listener=listener)
    store.set("k", "v")
    assert store.get("k") == b"v"
    with pytest.raises(RuntimeError, match="already handed to a store"):
        listener.take_fd()
