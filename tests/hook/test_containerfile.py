"""The Containerfile's targets: their COPY sources exist, and each entrypoint works from a
fresh venv install of exactly what its stage copies (no container engine on this machine).
hook: the sidecar on the python image; node-helper: the agent on Debian 12 with bcc."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from hook_sidecar.proto import api_v1alpha3_pb2

from .conftest import REPO, Client

CONTAINERFILE = REPO / "Containerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stage(name: str) -> list[tuple[str, str]]:
    """The instructions of one build stage."""
    result: list[tuple[str, str]] | None = None
    for ins, args in instructions():
        if ins == "FROM":
            if result is not None:
                return result
            if args.split()[-1] == name and " AS " in f" {args.upper()} ":
                result = []
        elif result is not None:
            result.append((ins, args))
    assert result is not None, f"no stage {name!r}"
    return result


def local_copies(stage_name: str | None = None) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context (of one stage)."""
    out = []
    for ins, args in (stage(stage_name) if stage_name else instructions()):
        if ins == "COPY" and "--from=" not in args:
            *sources, dest = args.split()
            out.append((sources, dest))
    return out


def test_hook_target_is_small_and_unprivileged() -> None:
    hook = stage("hook")
    assert ("USER", "107:107") in hook
    (entry,) = [json.loads(a) for i, a in hook if i == "ENTRYPOINT"]
    assert entry == ["/opt/netaccel/bin/netaccel-hook", "serve"]
    assert not any(i == "COPY" and "--from=build" not in a for i, a in hook), \
        "the runtime stage should only take the built venv"
    bases = [a for i, a in instructions() if i == "FROM" and a.split()[-1] in ("build", "hook")]
    assert len(bases) == 2 and all("${PYTHON_IMAGE}" in b for b in bases)
    assert "slim" in CONTAINERFILE.read_text()


def test_every_copied_file_exists() -> None:
    copies = local_copies()
    assert copies
    for sources, _ in copies:
        for src in sources:
            assert (REPO / src).exists(), f"Containerfile copies {src}, which is missing"


def replay_copies(stage_name: str, ctx: Path) -> None:
    """Copy what the stage's COPY instructions take from the build context into `ctx`."""
    ctx.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for sources, dest in local_copies(stage_name):
        for src in sources:
            target = ctx / dest if dest.endswith("/") and (REPO / src).is_dir() else ctx
            if (REPO / src).is_dir():
                shutil.copytree(REPO / src, target, ignore=ignore, dirs_exist_ok=True)
            else:
                shutil.copy2(REPO / src, target / Path(src).name)


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Replay the build stage: copy what it copies, `pip install` it into a new venv."""
    tmp = tmp_path_factory.mktemp("image")
    ctx = tmp / "src"
    replay_copies("build", ctx)
    venv = tmp / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, timeout=120)
    res = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ctx)],
                         capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    return venv


def test_entrypoint_from_fresh_install(fresh_install: Path, tmp_path: Path) -> None:
    hook = fresh_install / "bin" / "netaccel-hook"
    res = subprocess.run([str(hook), "--help"], capture_output=True, timeout=60)
    assert res.returncode == 0 and b"serve" in res.stdout
    # no dev extras: the generated modules must not need grpcio-tools
    res = subprocess.run([str(fresh_install / "bin" / "python"), "-c", "import grpc_tools"],
                         capture_output=True, timeout=60)
    assert res.returncode != 0

    sock = tmp_path / "hooks" / "netaccel.sock"
    (entry,) = [json.loads(a) for i, a in stage("hook") if i == "ENTRYPOINT"]
    cmd = [str(hook), *entry[1:], "--socket", str(sock), "--version", "v1alpha3"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.01)
        info = Client(sock).info()
        assert info.name == "netaccel" and list(info.versions) == ["v1alpha3"]
        assert Client(sock).call("v1alpha3", "Shutdown") == api_v1alpha3_pb2.ShutdownResult()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- node-helper ------------------------------------------------------------------------

NODE_ENTRYPOINT = ["/opt/netaccel/bin/netaccel", "node", "run", "--kubernetes"]


def test_node_helper_target_is_debian_bcc_without_the_lab() -> None:
    node = stage("node-helper")
    (base,) = [a for i, a in instructions() if i == "FROM" and a.split()[-1] == "node-helper"]
    assert "${DEBIAN_IMAGE}" in base
    assert "ARG DEBIAN_IMAGE=docker.io/library/debian:12-slim" in CONTAINERFILE.read_text()
    runs = " ".join(a for i, a in node if i == "RUN")
    assert "python3-bpfcc" in runs and "python3-venv" in runs
    assert "/usr/bin/python3 -m venv --system-site-packages /opt/netaccel" in runs
    assert '"/src[node]"' in runs and "import bcc" in runs
    copied = [src for sources, _ in local_copies("node-helper") for src in sources]
    assert sorted(copied) == ["bpf/", "node_helper/", "pyproject.toml", "setup.py"]
    assert not any(c.startswith(("lab", "tests", "hook_sidecar")) for c in copied)
    (entry,) = [json.loads(a) for i, a in node if i == "ENTRYPOINT"]
    assert entry == NODE_ENTRYPOINT


@pytest.fixture(scope="module")
def node_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Replay the node-helper stage on this Debian 12: its copies, a --system-site-packages
    venv on /usr/bin/python3, `pip install /src[node]`."""
    tmp = tmp_path_factory.mktemp("node-image")
    ctx = tmp / "src"
    replay_copies("node-helper", ctx)
    link = ctx / "node_helper" / "bpf"  # the stage's `rm -f node_helper/bpf` (a dev symlink)
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    venv = tmp / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    res = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{ctx}[node]"],
                         capture_output=True, timeout=600)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    return venv


def test_node_helper_entrypoint_from_fresh_install(node_install: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    py = str(node_install / "bin" / "python")
    res = subprocess.run([py, "-c", "import bcc, kubernetes, prometheus_client, yaml, "
                          "node_helper.agent, node_helper.vm.api, node_helper.source_static, "
                          "node_helper.source_kubernetes, node_helper.netns_discovery; "
                          "import importlib.util as u; print(u.find_spec('lab'))"],
                         capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "None", res.stderr
    netaccel = str(node_install / "bin" / "netaccel")
    res = subprocess.run([netaccel, "node", "--help"], capture_output=True, text=True,
                         timeout=60, env=env, cwd=tmp_path)
    assert res.returncode == 0 and "--kubernetes" in res.stdout
    # The entrypoint outside a cluster, without credentials: exit 2, says what to give it.
    res = subprocess.run([netaccel, *NODE_ENTRYPOINT[1:], "--node-name", "n1"],
                         capture_output=True, text=True, timeout=60,
                         env=env | {"HOME": str(tmp_path)}, cwd=tmp_path)
    assert res.returncode == 2 and "--kubeconfig" in res.stderr, res.stderr
