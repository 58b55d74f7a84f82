"""A running source for the tests; playing kubelet and KubeVirt (namespaces, pods bound to
nodes with their status addresses, VMIs with the node label and their virt-launcher pods) is
lab.kube's `Cluster`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from lab.kube import Cluster, unique
from node_helper.desired import DesiredState
from node_helper.source_kubernetes import KubernetesSource

__all__ = ["Cluster", "Running", "unique"]


class Running:
    """A KubernetesSource running in a thread; the snapshots it published."""

    def __init__(self, source: KubernetesSource) -> None:
        self.source = source
        self.snapshots: list[DesiredState] = []
        self.error: BaseException | None = None
        self.stop_event = threading.Event()
        self._cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.source.run(self._publish, self.stop_event)
        except BaseException as exc:  # handed to the test
            self.error = exc
        finally:
            with self._cond:
                self._cond.notify_all()

    def _publish(self, state: DesiredState) -> None:
        with self._cond:
            self.snapshots.append(state)
            self._cond.notify_all()

    @property
    def latest(self) -> DesiredState | None:
        return self.snapshots[-1] if self.snapshots else None

    def wait_for(self, check: Callable[[DesiredState], bool], timeout: float = 15.0,
                 what: str = "") -> DesiredState:
        """The first published snapshot (latest first) for which `check` holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self.latest is not None and check(self.latest):
                    return self.latest
                if self.error is not None:
                    raise AssertionError(f"the source failed: {self.error!r}") from self.error
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no snapshot {what} after {timeout}s; latest: "
                                         f"{self.latest}; stats: {self.source.stats}")
                self._cond.wait(left)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "the source did not stop within 15 s"
