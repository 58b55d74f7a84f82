"""Session-wide: a NETACCEL_INSTANCE of its own, so pins and locks never meet a real agent's
(or another test run's), and nothing of it is left under /sys/fs/bpf or in /run afterwards."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("NETACCEL_INSTANCE", f"nt{os.getpid() % 10**8}")


@pytest.fixture(scope="session", autouse=True)
def nothing_of_this_run_left() -> Iterator[None]:
    yield
    from node_helper import kernel
    from node_helper.vm import bpf

    bpf.unpin_all()
    for lock in kernel.lock_file("x").parent.glob(f"{kernel.instance()}-*.lock"):
        lock.unlink(missing_ok=True)
