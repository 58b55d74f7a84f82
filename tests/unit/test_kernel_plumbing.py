"""Pure parts of node_helper.kernel: mountinfo parsing, header discovery."""

from __future__ import annotations

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


def test_fallback_headers_pick_newest_complete_pair(tmp_path: Path) -> None:
    for name in ("linux-headers-6.1.0-9-amd64", "linux-headers-6.1.0-9-common",
                 "linux-headers-6.1.0-56-amd64", "linux-headers-6.1.0-56-common",
                 "linux-headers-6.1.0-60-amd64"):  # no -common: incomplete
        (tmp_path / name / "include").mkdir(parents=True)
    build, common = kernel.fallback_header_dirs(tmp_path)
    assert build.name == "linux-headers-6.1.0-56-amd64"
    assert common.name == "linux-headers-6.1.0-56-common"
    assert kernel.fallback_header_dirs(tmp_path / "nothing") is None
