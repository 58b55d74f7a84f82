"""The agent as a user installs it: a wheel from a clean `git archive`, in a fresh venv,
run from outside the checkout (finds its BPF sources as package data, no lab inside)."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from lab.testbed import Testbed
from node_helper import sockets

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=420, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a fresh venv holding the wheel built from the tree as git sees it."""
    tmp = tmp_path_factory.mktemp("wheel")
    # `git stash create` snapshots tracked changes without touching the tree (HEAD if none).
    snap = _run(["git", "stash", "create"], cwd=REPO)
    assert snap.returncode == 0, f"git cannot snapshot the tree: {snap.stderr or snap.stdout}"
    rev = snap.stdout.strip() or "HEAD"
    archive = tmp / "src.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), rev], cwd=REPO,
                   check=True)
    src = tmp / "src"
    src.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(src)], check=True)
    pip = [str(REPO / ".venv" / "bin" / "python"), "-m", "pip"]
    built = _run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                        str(src)])
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("netaccel-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "node_helper/bpf/sockmap.c" in names and "node_helper/bpf/netaccel_abi.h" in names
    assert "node_helper/vm/api.py" in names and "node_helper/agent.py" in names
    assert not [n for n in names if n.startswith("lab/")], "the lab must not ship"
    venv = tmp / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    res = _run([str(venv / "bin" / "pip"), "install", "-q", f"{wheel}[node]"])
    assert res.returncode == 0, res.stderr[-2000:]
    return venv / "bin"


def test_installed_agent_runs_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run([str(installed / "python"), "-c",
                  "import node_helper, importlib.util as u; print(node_helper.__file__); "
                  "print(u.find_spec('lab'))"], cwd=tmp_path, env=env)
    module, lab = where.stdout.split()
    assert module.startswith(str(installed.parent)) and lab == "None"
    doctor = _run([str(installed / "netaccel"), "doctor", "--json"], cwd=tmp_path, env=env)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert all(c["ok"] for c in json.loads(doctor.stdout))
    with Testbed.create(pods=2) as bed:
        try:
            cidrs = [a for c in bed.pod_cidrs() for a in ("--cidr", c)]
            on = _run([str(installed / "netaccel"), "bypass", "on", *cidrs, "--json"],
                      cwd=tmp_path, env=env)
            assert on.returncode == 0, on.stderr
            assert json.loads(on.stdout)["enabled"] is True
            assert sockets.status()["enabled"]  # the same pins the checkout's code reads
            off = _run([str(installed / "netaccel"), "bypass", "off"], cwd=tmp_path, env=env)
            assert off.returncode == 0, off.stderr
            assert sockets.attached_programs() == [] and not sockets.PIN_DIR.exists()
        finally:
            sockets.disable()
