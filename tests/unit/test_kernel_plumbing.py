"""Pure parts of node_helper.kernel: mountinfo parsing, headers, instance names."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from node_helper import kernel

HYBRID = """\
25 30 0:22 / /sys rw,nosuid - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
40 33 0:35 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
41 33 0:36 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
"""
UNIFIED = "33 25 0:28 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
NESTED = UNIFIED + "90 33 0:28 /kubepods /host/cgroup rw - cgroup2 cgroup2 rw\n"


@pytest.mark.parametrize("text, root", [
    (HYBRID, "/sys/fs/cgroup/unified"),
    (UNIFIED, "/sys/fs/cgroup"),
    (NESTED, "/sys/fs/cgroup"),  # a bind mount of a sub-cgroup is not the root
])
def test_cgroup2_root(tmp_path: Path, text: str, root: str) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(text)
    assert kernel.cgroup2_root(mountinfo) == Path(root)


def test_no_cgroup2_is_a_clear_error(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(HYBRID.replace("cgroup2 cgroup2", "tmpfs tmpfs"))
    with pytest.raises(kernel.KernelFeatureError, match="no cgroup v2"):
        kernel.cgroup2_root(mountinfo)


def test_bcc_headers_reports_instead_of_linking(tmp_path: Path) -> None:
    with pytest.raises(kernel.KernelFeatureError, match="scripts/setup.sh"):
        kernel.bcc_headers(tmp_path)
    assert list(tmp_path.iterdir()) == []
    build = tmp_path / platform.release() / "build"
    (build / "include").mkdir(parents=True)
    assert kernel.bcc_headers(tmp_path) == build


@pytest.mark.parametrize("name", ["", "Netaccel", "1abc", "a" * 12, "na-1", "na_1"])
def test_instance_names_that_cannot_prefix_a_program_are_refused(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETACCEL_INSTANCE", name)
    with pytest.raises(ValueError, match="NETACCEL_INSTANCE"):
        kernel.instance()


def test_instance_scopes_pins_and_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETACCEL_INSTANCE", "t1a2b")
    assert kernel.pin_dir("bypass") == Path("/sys/fs/bpf/t1a2b/bypass")
    assert kernel.lock_file("vm") == Path("/run/t1a2b-vm.lock")
    monkeypatch.delenv("NETACCEL_INSTANCE")
    assert kernel.pin_dir("bypass") == Path("/sys/fs/bpf/netaccel/bypass")


def test_netns_path_takes_a_name_or_an_absolute_path() -> None:
    assert kernel.netns_path("na1-vm0") == kernel.NETNS_DIR / "na1-vm0"
    assert kernel.netns_path("/proc/42/ns/net") == Path("/proc/42/ns/net")
    for bad in ("", "proc/42/ns/net", "..", "."):
        with pytest.raises(ValueError):
            kernel.netns_path(bad)


def test_cgroup_root_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(UNIFIED)
    monkeypatch.setenv("NETACCEL_CGROUP_ROOT", str(tmp_path))
    assert kernel.cgroup2_root(mountinfo) == tmp_path
    monkeypatch.setenv("NETACCEL_CGROUP_ROOT", str(tmp_path / "missing"))
    with pytest.raises(kernel.KernelFeatureError, match="NETACCEL_CGROUP_ROOT"):
        kernel.cgroup2_root(mountinfo)
