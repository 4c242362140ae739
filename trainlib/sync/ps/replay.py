"""Replay protection with bounded memory: server-issued client instances and a sequence window.

Every HELLO is answered with a fresh client instance id, issued in order (1, 2, 3, ...) by this
server run; the server stores nothing for it then, so a HELLO changes no state and a replayed one
costs only its reply. A client's stateful requests carry (session, instance, seq), all under the
request MAC; the server keeps, per instance, the highest seq it accepted, and only for the
`cap` most recently active instances (LRU). A message is fresh when

    instance was issued by this run (instance < next)            else "bad_instance"
    instance is in the table and seq > its last seq              else "replay"
    or instance is not in the table and instance >= floor        (its first request)
    where floor = 1 + the largest instance ever evicted          else "expired_instance"

so an evicted instance can never come back: captured messages stay unreplayable after their
entry is forgotten, and the table never holds more than `cap` entries however many workers
restart or STATS pollers come and go. A live worker whose instance was evicted (idle while `cap`
others were active), or whose fresh instance fell below the floor before its first request, is
told so with a short EXPIRED reply (server.py) and re-handshakes and resends (client.py): the
only answer the server gives to a message it refuses. A replayed message from a forgotten
instance gets that same answer, which carries nothing but the echoed header fields.
The session id (random per server run, checked on every request) keeps messages captured from an
earlier run of a server with the same token from being accepted by a restarted one.
"""
from __future__ import annotations

from collections import OrderedDict

DEFAULT_MAX_CLIENTS = 4096


class ReplayWindow:
    """Issued instances and their last accepted sequence numbers (at most `cap` of them)."""

    def __init__(self, cap: int = DEFAULT_MAX_CLIENTS):
        if cap < 1:
            raise ValueError(f"max clients {cap} must be >= 1")
        self.cap = cap
        self.next = 1          # the next instance id to issue; 0 is never issued
        self.floor = 1         # instances below it that are not in the table were evicted
        self.last: OrderedDict[int, int] = OrderedDict()  # instance -> last accepted seq, LRU order
        self.evicted = 0
        self.accepted = 0

    def issue(self) -> int:
        instance, self.next = self.next, self.next + 1
        return instance

    def check(self, instance: int, seq: int) -> str | None:
        """None if (instance, seq) is fresh (and record it), else the reason to drop it."""
        if not 0 < instance < self.next:
            return "bad_instance"
        last = self.last.get(instance)
        if last is None:
            if instance < self.floor:
                return "expired_instance"
            last = 0
        if seq <= last:
            return "replay"
        self.last[instance] = seq
        self.last.move_to_end(instance)
        self.accepted += 1
        while len(self.last) > self.cap:
            old, _ = self.last.popitem(last=False)
            self.floor = max(self.floor, old + 1)
            self.evicted += 1
        return None

    def stats(self) -> dict:
        """Sizes only: the table itself stays on the server."""
        return {"entries": len(self.last), "cap": self.cap, "issued": self.next - 1, "evicted": self.evicted,
                "floor": self.floor, "accepted": self.accepted}
