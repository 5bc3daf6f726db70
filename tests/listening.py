"""Which local addresses listen on a TCP port: to check that rendezvous stores bind one address, not all."""

from __future__ import annotations

import ipaddress


def listening_addresses(port: int) -> set[str]:
    """Addresses (IPv4 and IPv6, as text) on which some process of this network namespace listens on `port`."""
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            with open(table) as fh:
                lines = list(fh)[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # The kernel prints each 32-bit word in host (little-endian) order.
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
                found.add(str(ipaddress.ip_address(raw)))
    return found
