"""The demotion policy's user-space half: remove qualified senders from the sockhash.

bpf/sockmap.c (DEMOTION) watches every bypassed direction. One that streams small messages
one-way at a high rate qualifies; its sending socket X then closes the way into itself (its
entry says `demoted`: its peer's next message takes TCP) and queues itself as a candidate.
Only user space (or sock_ops) may delete from a SOCKHASH; this module does, for each
candidate, once it is order-safe (sockmap.c, rule 11):

  A. no redirect of the peer into X is in flight: X's entry has `pending` clear, or older
     than SPLICE_PENDING_GRACE_NS (the splice guard's handshake, rule 9);
  B. X's own redirect queue was seen empty *after* A held (X's sk_msg reports `drained_ts`
     while it keeps sending; nothing can be queued into X after A, so empty stays empty).

Then deleting X drops only an empty psock: X's later messages take TCP, and its receiver,
which stays in the sockhash, reads X's earlier redirected bytes before TCP's (rule 4).
A candidate whose socket closed is dropped; one that is not safe within GIVE_UP seconds (X
stopped sending, or its application never reads what its peer sent) is left as it is:
X stays bypassed, the peer's direction on TCP (both order-safe).

The agent runs `run()` in a thread (like the splice guard); `netaccel bypass demote` runs it in
the foreground, and `netaccel bypass guard` runs both.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from node_helper import bpf_abi, sockets

log = logging.getLogger("netaccel.demote")
INTERVAL = 0.05   # seconds between polls: a qualified stream waits at most about this long
GIVE_UP = 30.0    # seconds a candidate may wait for its safety conditions
GRACE_NS = bpf_abi.constant("SPLICE_PENDING_GRACE_NS")


def monotonic_ns() -> int:
    """The clock of bpf_ktime_get_ns() (CLOCK_MONOTONIC)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@dataclass
class Candidate:
    key: bytes
    cookie: int
    name: str
    since: float              # time.monotonic() when it was taken from the queue
    quiet_at: int | None = None  # monotonic ns right after condition A was seen to hold


def _entry(key: bytes) -> dict[str, Any] | None:
    return sockets.peer_entry(key)


class Demoter:
    """Candidates in, sockets out of the sockhash. One instance per polling thread."""

    def __init__(self, give_up: float = GIVE_UP) -> None:
        self.waiting: dict[bytes, Candidate] = {}
        self.give_up = give_up
        self.demoted = 0
        self.abandoned = 0
        self.reasons: dict[str, int] = {}  # why candidates ended (diagnosis, tests)

    def poll(self) -> list[dict[str, Any]]:
        """One round: take new candidates, demote the ones that are safe now; return those."""
        now = time.monotonic()
        for c in sockets.pop_demote_candidates():
            self.waiting.setdefault(c["key"], Candidate(
                c["key"], c["cookie"], f"{c['local']}:{c['lport']} -> {c['remote']}:{c['rport']}",
                now))
        done: list[dict[str, Any]] = []
        abandoned = 0
        for key, cand in list(self.waiting.items()):
            verdict = self._step(cand)
            if verdict == "wait" and now - cand.since > self.give_up:
                verdict = "abandoned"
            if verdict == "wait":
                continue
            self.reasons[verdict] = self.reasons.get(verdict, 0) + 1
            del self.waiting[key]
            if verdict == "demoted":
                done.append({"socket": cand.name, "waited": round(now - cand.since, 3)})
            else:
                abandoned += 1
                log.info("demotion of %s abandoned (%s)", cand.name, verdict)
        if done or abandoned:
            self.demoted += len(done)
            self.abandoned += abandoned
            with contextlib.suppress(OSError):
                sockets.add_demote_counters(demoted=len(done), abandoned=abandoned)
        return done

    def _step(self, cand: Candidate) -> str:
        try:
            entry = _entry(cand.key)
        except OSError:
            return "bypass off"
        if entry is None or entry["cookie"] != cand.cookie:
            return "closed"
        if not entry["demoted"]:
            return "not marked"  # cannot happen: the program marks before it queues
        if cand.quiet_at is None:
            # A: no redirect into X is in flight (rule 9's `pending`, as the splice guard
            # reads it). The time is taken after the read.
            in_flight = entry["pending"] and monotonic_ns() - entry["pending_ts"] <= GRACE_NS
            if in_flight:
                return "wait"
            cand.quiet_at = monotonic_ns()
            return "wait"
        # B: X saw its own queue empty after A held. A lookup copies the entry while X's
        # program may write it: a second read must agree (no torn drained_ts decides), and
        # shows the same socket still (a reused 4-tuple would have another cookie).
        if entry["drained_ts"] <= cand.quiet_at:
            return "wait"
        again = _entry(cand.key)
        if again is None or again["cookie"] != cand.cookie:
            return "closed"
        if again["drained_ts"] <= cand.quiet_at:
            return "wait"
        return "demoted" if sockets.remove_socket(cand.key) else "closed"


def run(stop: threading.Event, interval: float = INTERVAL, on_demote: Any = None,
        demoter: Demoter | None = None) -> None:
    """Demote qualified connections as they are reported, until `stop` is set."""
    demoter = demoter or Demoter()
    while not stop.is_set():
        for event in demoter.poll():
            log.debug("demoted %s", event["socket"])
            if on_demote is not None:
                with contextlib.suppress(Exception):
                    on_demote(event)
        stop.wait(interval)
