"""Session-wide set-up for every test.

Each run takes its own agent instance name (node_helper.kernel.instance): its pins, lock
files and BPF program names differ from a node's agent and from any other test run on the
same host, so two runs never detach or unpin each other's programs.
"""

from __future__ import annotations

import os

os.environ["NETACCEL_INSTANCE"] = f"t{os.getpid():x}"[:11]
