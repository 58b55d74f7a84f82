"""Native helpers of the kernel tests, built on first use into a cache outside the repository.

- `uring()`: uring_helper/uring.c (liburing, gcc): io_uring recv/send/splice on an inherited fd.
- `splice_proxy()`: splice_proxy/ (Go, no external modules): a TCP forwarder whose copies are
  io.Copy between two *net.TCPConn, i.e. splice(2) on Linux.

Each build lands in /var/cache/netaccel/<name>-<hash of the sources and tool>, so a changed
source builds anew and concurrent test runs (other worktrees) never share a half-written file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

CACHE = Path("/var/cache/netaccel")
HERE = Path(__file__).resolve().parent
GO_CANDIDATES = ("/usr/local/go/bin/go", "go")


def _digest(files: list[Path], tool: list[str]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(subprocess.run(tool, capture_output=True, check=True).stdout)
    return h.hexdigest()[:16]


def _build(name: str, files: list[Path], version: list[str], build: list[str],
           env: dict[str, str] | None = None, cwd: Path | None = None) -> Path:
    out_dir = CACHE / f"{name}-{_digest(files, version)}"
    binary = out_dir / name
    if binary.exists():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():
            return binary
        out_dir.mkdir(exist_ok=True)
        tmp = out_dir / f".{name}.{os.getpid()}"
        r = subprocess.run([*build, "-o", str(tmp)], capture_output=True, text=True,
                           env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)
        assert r.returncode == 0, f"building {name} failed:\n{r.stdout}{r.stderr}"
        tmp.rename(binary)
    return binary


def uring() -> Path:
    src = HERE / "uring_helper" / "uring.c"
    assert Path("/usr/include/liburing.h").exists(), (
        "liburing-dev is missing (scripts/setup.sh installs it)")
    return _build("uring", [src], ["gcc", "--version"],
                  ["gcc", "-O2", "-Wall", "-Werror", str(src), "-luring"])


def go_tool() -> str:
    for cand in GO_CANDIDATES:
        if path := shutil.which(cand):
            return path
    raise AssertionError("no Go toolchain (/usr/local/go/bin/go or go on PATH)")


def splice_proxy() -> Path:
    src = HERE / "splice_proxy"
    go = go_tool()
    cache = CACHE / "go-build"
    return _build("go-splice", sorted(src.glob("*.go")) + [src / "go.mod"], [go, "version"],
                  [go, "build", "-trimpath"],
                  env={"GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "-mod=mod",
                       "GOCACHE": str(cache), "GOPATH": str(CACHE / "go-path")},
                  cwd=src)
