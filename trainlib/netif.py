"""Which local interface and address reach a peer: what gloo, NCCL and the parameter server advertise.

gloo and NCCL, when GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are unset, advertise the address that
the machine's hostname resolves to. On Debian and in many container images that is 127.0.1.1 (an
/etc/hosts line), so every peer on another node connects to its own loopback and fails with
"connectFullMesh ... Connection refused, remote=[127.0.1.1]". The interface that routes to
MASTER_ADDR is the one every rank of a multi-node job can be reached on; the kernel's routing table
tells us which it is without sending a packet (a UDP connect() only picks a route and a source).
"""
from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass

SIOCGIFADDR = 0x8915
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


@dataclass(frozen=True)
class Route:
    ifname: str          # e.g. "eth0"
    address: str         # this host's source address on it, e.g. "10.0.3.7"
    peer: str            # the resolved peer address the route was looked up for


class RouteError(RuntimeError):
    pass


def resolve(host: str) -> str:
    """host (a name or an address) as an IPv4/IPv6 address string; RouteError naming the host."""
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)[0][4][0]
    except (socket.gaierror, IndexError, UnicodeError) as e:
        raise RouteError(f"cannot resolve {host!r} ({e}); is MASTER_ADDR the rank-0 pod's Service or IP, "
                         "and does this pod's DNS reach it?") from None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(resolve(host)).is_loopback
    except (RouteError, ValueError):
        return host in ("localhost",)


def source_address(peer: str) -> str:
    """This host's address on the route to peer (no packet is sent)."""
    family = socket.AF_INET6 if ":" in peer else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((peer, 9))
        except OSError as e:
            raise RouteError(f"no route to {peer} ({e}); check the pod network") from None
        return s.getsockname()[0]


def interface_addresses() -> dict[str, str]:
    """{interface name: its IPv4 address} for the interfaces that have one."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            out[name] = socket.inet_ntoa(raw[20:24])
    return out


def route_to(host: str) -> Route:
    """The interface and source address this host uses to reach `host`."""
    peer = resolve(host)
    src = source_address(peer)
    names = [n for n, a in interface_addresses().items() if a == src]
    if not names:
        raise RouteError(f"the route to {host} ({peer}) leaves from {src}, which no interface carries")
    return Route(names[0], src, peer)


def default_route_ifname(proc_route: str = "/proc/net/route") -> str | None:
    """The interface of the IPv4 default route (how a pod reaches other pods), from the kernel's table."""
    try:
        with open(proc_route) as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return None
    for row in rows:
        if len(row) > 2 and row[1] == "00000000" and int(row[3], 16) & 0x1:   # destination 0/0, route up
            return row[0]
    return None


def socket_ifname_env(env: dict[str, str], master_addr: str | None) -> tuple[dict[str, str], str | None]:
    """GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME for a multi-node job, unless the user set them.

    Returns (variables to add, a sentence saying what was chosen and why, or None)."""
    if not master_addr or any(env.get(v) for v in IFNAME_VARS):
        return {}, None
    if is_loopback(master_addr):
        return {}, None
    try:
        route = route_to(master_addr)
    except RouteError as e:
        # a PyTorchJob's master Service may not resolve until its pod is up: use the default route's
        # interface, which is how a pod reaches the others
        ifname = default_route_ifname()
        if ifname is None:
            return {}, f"{e}; no default route either, so gloo/NCCL pick the interface from the hostname"
        return ({v: ifname for v in IFNAME_VARS},
                f"GLOO_SOCKET_IFNAME=NCCL_SOCKET_IFNAME={ifname}: the default route's interface ({e.args[0]}); "
                "set either variable to choose another")
    add = {v: route.ifname for v in IFNAME_VARS}
    return add, (f"GLOO_SOCKET_IFNAME=NCCL_SOCKET_IFNAME={route.ifname}: the interface that routes to MASTER_ADDR "
                 f"{master_addr} (this node is {route.address} there); set either variable to choose another")
