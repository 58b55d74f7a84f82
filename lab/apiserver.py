"""A real etcd + kube-apiserver on loopback for the tests and the lab's benchmarks (stdlib
only).

Usage::

    with running_apiserver() as api:
        api.url        # "https://127.0.0.1:<port>"
        api.token      # bearer token of user "admin" in group system:masters
        api.ca_file    # CA that signed the serving certificate
        api.kubeconfig # kubeconfig file for clients that want one
        api.request("GET", "/api/v1/namespaces")
        api.restart_apiserver()   # new kube-apiserver process, same etcd and ports
        api.compact_etcd(restart_apiserver=True)  # old resourceVersions now 410
        api.install_crd({...})    # create a CRD and wait until it is served

The binaries come from scripts/build-kube-apiserver.sh (cached under
/var/cache/netaccel); ``$NETACCEL_KUBE_APISERVER`` and ``$NETACCEL_ETCD``
override them.

There is no controller-manager, scheduler or kubelet: Pods stay Pending unless
the test patches their status, namespaces are not finalized (they stay
Terminating), no ServiceAccount "default" is created (so the ServiceAccount
admission plugin is disabled by default), and a Pod bound to a node is only
removed at once when deleted with gracePeriodSeconds=0.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

__all__ = [
    "APIServer",
    "APIServerError",
    "find_binaries",
    "running_apiserver",
]

CACHE_ROOT = Path(os.environ.get("NETACCEL_CACHE", "/var/cache/netaccel"))
ADMIN_USER = "admin"
ADMIN_GROUP = "system:masters"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
DEFAULT_SERVICE_CIDR = "10.96.0.0/12"

_PR_SET_PDEATHSIG = 1


class APIServerError(RuntimeError):
    """etcd or kube-apiserver failed to start, stop or answer."""


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.parent.name))


def _newest_cached(name: str) -> Path | None:
    found = sorted(CACHE_ROOT.glob(f"{name}/v*/{name}"), key=_version_key)
    return found[-1] if found else None


def find_binaries() -> tuple[Path, Path]:
    """Return ``(kube_apiserver, etcd)`` paths.

    ``$NETACCEL_KUBE_APISERVER`` / ``$NETACCEL_ETCD`` win; otherwise the newest
    version cached by build-kube-apiserver.sh.
    """
    result = []
    for name, env in (("kube-apiserver", "NETACCEL_KUBE_APISERVER"), ("etcd", "NETACCEL_ETCD")):
        path = Path(os.environ[env]) if os.environ.get(env) else _newest_cached(name)
        if path is None or not os.access(path, os.X_OK):
            raise APIServerError(
                f"no {name} binary (looked at ${env} and {CACHE_ROOT}/{name}/v*/{name}); "
                "run build-kube-apiserver.sh first"
            )
        result.append(path)
    return result[0], result[1]


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """preexec_fn: have the kernel SIGKILL the child if the test process dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_SETPRIV = shutil.which("setpriv")  # util-linux; sets PDEATHSIG without preexec_fn


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], check=False, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise APIServerError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


def make_pki(directory: Path) -> dict[str, Path]:
    """Create a throw-away CA, a serving cert for 127.0.0.1/localhost signed by
    it, and a service-account signing key pair, all EC P-256, valid 7 days.

    Returns the paths keyed by ``ca``, ``cert``, ``key``, ``sa_key``, ``sa_pub``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "7",
             "-subj", "/CN=netaccel-test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    _openssl("req", *ec, "-keyout", "apiserver.key", "-out", "apiserver.csr",
             "-subj", "/CN=kube-apiserver", cwd=directory)
    (directory / "apiserver.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
    )
    _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "7", "-extfile", "apiserver.ext",
             "-out", "apiserver.crt", cwd=directory)
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-out", "sa.key", cwd=directory)
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=directory)
    return {
        "ca": directory / "ca.crt",
        "cert": directory / "apiserver.crt",
        "key": directory / "apiserver.key",
        "sa_key": directory / "sa.key",
        "sa_pub": directory / "sa.pub",
    }


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text[-lines:])


def _rss_bytes(pid: int) -> int:
    """Resident set size of a live process, 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class _Process:
    """A child process with its log file."""

    name: str
    argv: list[str]
    log: Path
    die_with_parent: bool
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv, preexec = self.argv, None
        if self.die_with_parent:
            # setpriv execs the binary (same PID) with PDEATHSIG set; the
            # preexec_fn fallback is not safe in multi-threaded parents.
            if _SETPRIV:
                argv = [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]
            else:
                preexec = _die_with_parent
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's ^C reaches only pytest
                preexec_fn=preexec,  # noqa: PLW1509 (only without setpriv)
            )

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen else 0

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self) -> None:
        """Raise with the log tail if the process has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            raise APIServerError(
                f"{self.name} exited with code {self.popen.returncode}; log tail ({self.log}):\n"
                f"{_tail(self.log)}"
            )

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; always reaps."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(10)
        self.popen = None


@dataclass
class APIServer:
    """A running etcd + kube-apiserver pair; see :func:`running_apiserver`."""

    url: str
    token: str
    ca_file: Path
    kubeconfig: Path
    workdir: Path
    etcd_url: str
    kube_apiserver_binary: Path
    etcd_binary: Path
    ready_timeout: float
    _etcd: _Process = field(repr=False)
    _apiserver: _Process = field(repr=False)
    _ssl: ssl.SSLContext = field(repr=False)

    # -- plain HTTP helpers ---------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """An SSL context that trusts the server's CA."""
        return self._ssl

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> tuple[int, Any]:
        """Call the API server; returns ``(status, decoded JSON or text)``.

        HTTP errors are returned, not raised. ``token`` defaults to the admin
        token; pass ``""`` for an anonymous request.
        """
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        bearer = self.token if token is None else token
        if bearer:
            req.add_header("Authorization", f"Bearer {bearer}")
        if data is not None:
            req.add_header("Content-Type", content_type)
        req.add_header("Accept", "application/json")
        try:
            with urllib.request.urlopen(req, context=self._ssl, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def _ready_status(self) -> tuple[int, str]:
        try:
            status, body = self.request("GET", "/readyz?verbose", timeout=5)
            return status, str(body)
        except (OSError, urllib.error.URLError) as exc:
            return 0, str(exc)

    def wait_ready(self, timeout: float | None = None) -> float:
        """Wait until ``/readyz`` answers 200; returns the seconds waited.

        Raises :class:`APIServerError` with the log tail if the process exits
        or the timeout passes.
        """
        timeout = self.ready_timeout if timeout is None else timeout
        start = time.monotonic()
        last: tuple[int, str] = (0, "not asked yet")
        while time.monotonic() - start < timeout:
            self._apiserver.check_alive()
            last = self._ready_status()
            if last[0] == 200:
                return time.monotonic() - start
            time.sleep(0.1)
        failing = "\n".join(line for line in last[1].splitlines() if "failed" in line)
        failing = failing or last[1][-2000:]
        raise APIServerError(
            f"kube-apiserver not ready after {timeout:.1f}s (last /readyz: HTTP {last[0]}):\n"
            f"{failing}\n"
            f"log tail ({self._apiserver.log}):\n{_tail(self._apiserver.log)}"
        )

    # -- processes ------------------------------------------------------------

    @property
    def apiserver_pid(self) -> int:
        return self._apiserver.pid

    @property
    def etcd_pid(self) -> int:
        return self._etcd.pid

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory of both processes now."""
        return {"kube-apiserver": _rss_bytes(self._apiserver.pid),
                "etcd": _rss_bytes(self._etcd.pid)}

    def apiserver_log_tail(self, lines: int = 40) -> str:
        return _tail(self._apiserver.log, lines)

    def etcd_log_tail(self, lines: int = 40) -> str:
        return _tail(self._etcd.log, lines)

    def stop_apiserver(self, timeout: float = 15.0) -> None:
        """Stop kube-apiserver (SIGTERM, then SIGKILL after ``timeout`` s); etcd keeps running.

        With watches open, kube-apiserver v1.37 stops listening at once but its process
        lingers until the SIGKILL (seen here); pass a short ``timeout`` then."""
        self._apiserver.stop(timeout)

    def start_apiserver(self) -> float:
        """Start kube-apiserver again (same flags and port); returns seconds to ready."""
        if self._apiserver.alive():
            raise APIServerError("kube-apiserver is already running")
        with open(self._apiserver.log, "ab") as log:
            log.write(b"\n===== restart =====\n")
        self._apiserver.start()
        return self.wait_ready()

    def restart_apiserver(self, stop_timeout: float = 15.0) -> float:
        """Restart kube-apiserver keeping etcd (and so all objects); returns
        seconds to ready. Watch caches start empty afterwards, so watches from
        resourceVersions older than the restart get 410 Gone."""
        self.stop_apiserver(stop_timeout)
        return self.start_apiserver()

    def stop(self) -> None:
        """Stop kube-apiserver, then etcd."""
        try:
            self._apiserver.stop()
        finally:
            self._etcd.stop()

    # -- etcd -----------------------------------------------------------------

    def _etcd_call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            self.etcd_url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return cast("dict[str, Any]", json.loads(resp.read()))

    def etcd_revision(self) -> int:
        """The current etcd revision (what resourceVersions are made of)."""
        key = base64.b64encode(b"/").decode()
        resp = self._etcd_call("/v3/kv/range", {"key": key, "count_only": True})
        return int(resp["header"]["revision"])

    def compact_etcd(self, revision: int | None = None, *, restart_apiserver: bool = False,
                     stop_timeout: float = 15.0) -> int:
        """Compact etcd up to ``revision`` (default: past the newest write); returns it.

        Whatever asks etcd for a resourceVersion older than the newest one at
        the time of the call (with an explicit ``revision``: older than
        ``revision - 1``) then gets 410 Gone
        ("The resourceVersion for the provided watch is too old", reason
        Expired; a watch gets it as an ERROR event on a 200 stream).

        kube-apiserver's watch cache (on by default, as in real clusters) does
        not drop history on compaction: a watch from an old resourceVersion it
        still holds in memory keeps working (checked with v1.37.2). To force
        410 Gone either start the server with ``watch_cache=False`` or pass
        ``restart_apiserver=True``: the new process's cache starts at the
        current revision, so older resourceVersions are "too old resource
        version" 410s (this also closes open watches, as a real restart does).
        """
        if revision is None:
            # Compacting at revision R keeps R itself, and a watch from
            # resourceVersion X starts at X+1: with R = the newest object's
            # revision a watch from R-1 would start on a compacted-away
            # predecessor and kube-apiserver answers 500 ("PrevKv=nil")
            # instead of 410. A marker write outside /registry moves R past
            # every existing object, so every older resourceVersion gets 410.
            key = base64.b64encode(b"/netaccel-test/compaction-marker").decode()
            value = base64.b64encode(str(time.time()).encode()).decode()
            put = self._etcd_call("/v3/kv/put", {"key": key, "value": value})
            rev = int(put["header"]["revision"])
        else:
            rev = revision
        try:
            self._etcd_call("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            if "has been compacted" not in detail:  # already compacted that far: fine
                raise APIServerError(
                    f"etcd compaction at {rev} failed: HTTP {err.code}: {detail}") from err
        if restart_apiserver:
            self.restart_apiserver(stop_timeout)
        return rev

    # -- CRDs -----------------------------------------------------------------

    def install_crd(self, crd: Mapping[str, Any] | str | os.PathLike[str],
                    timeout: float = 60.0) -> dict[str, Any]:
        """Create a CustomResourceDefinition (a dict, or a path to a JSON file)
        and wait until it is Established and its resource is in discovery.

        Returns the CRD as stored. An already existing CRD of the same name
        is replaced.
        """
        obj: dict[str, Any] = (
            json.loads(Path(crd).read_text()) if isinstance(crd, (str, os.PathLike)) else dict(crd)
        )
        base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        name = obj["metadata"]["name"]
        status, body = self.request("POST", base, obj)
        if status == 409:
            _, current = self.request("GET", f"{base}/{name}")
            rv = current["metadata"]["resourceVersion"]
            obj.setdefault("metadata", {})["resourceVersion"] = rv
            status, body = self.request("PUT", f"{base}/{name}", obj)
        if status not in (200, 201):
            raise APIServerError(f"creating CRD {name} failed: HTTP {status}: {body}")
        group, plural = obj["spec"]["group"], obj["spec"]["names"]["plural"]
        versions = [v["name"] for v in obj["spec"]["versions"] if v.get("served", True)]
        deadline = time.monotonic() + timeout
        while True:
            _, body = self.request("GET", f"{base}/{name}")
            found = (body.get("status") or {}).get("conditions") or []
            conditions = {c["type"]: c["status"] for c in found}
            if conditions.get("Established") == "True" and all(
                self._in_discovery(group, v, plural) for v in versions
            ):
                return cast("dict[str, Any]", body)
            if time.monotonic() > deadline:
                raise APIServerError(
                    f"CRD {name} not established after {timeout}s: conditions {conditions}")
            time.sleep(0.1)

    def _in_discovery(self, group: str, version: str, plural: str) -> bool:
        status, body = self.request("GET", f"/apis/{group}/{version}")
        if status != 200 or not isinstance(body, dict):
            return False
        return any(r.get("name") == plural for r in body.get("resources", []))


def _write_kubeconfig(path: Path, url: str, ca: Path, token: str) -> None:
    """A kubeconfig (JSON is valid YAML) for the admin user."""
    path.write_text(json.dumps({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test",
                      "cluster": {"server": url, "certificate-authority": str(ca)}}],
        "users": [{"name": ADMIN_USER, "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": ADMIN_USER}}],
        "current-context": "test",
    }, indent=2))


def _wait_etcd(proc: _Process, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if json.loads(resp.read()).get("health") == "true":
                    return
        except (OSError, ValueError) as exc:
            last = str(exc)
        time.sleep(0.05)
    raise APIServerError(
        f"etcd not healthy after {timeout}s ({last}); log tail:\n{_tail(proc.log)}")


def _port_clash(log: Path) -> bool:
    return "address already in use" in _tail(log, 200)


@contextlib.contextmanager
def running_apiserver(
    *,
    kube_apiserver: str | os.PathLike[str] | None = None,
    etcd: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
    disable_admission_plugins: Sequence[str] = ("ServiceAccount",),
    service_cluster_ip_range: str = DEFAULT_SERVICE_CIDR,
    watch_cache: bool = True,
    etcd_progress_notify_interval: str = "1s",
    ready_timeout: float = 120.0,
    die_with_parent: bool = True,
    keep_workdir: bool = False,
) -> Iterator[APIServer]:
    """Start etcd and kube-apiserver on free 127.0.0.1 ports in a temp dir.

    Yields an :class:`APIServer` once ``/readyz`` answers 200. On exit (also
    on an exception, including a failed start) both processes get SIGTERM,
    then SIGKILL, and the temp dir is removed (unless ``keep_workdir``).

    Args:
        kube_apiserver, etcd: binaries (default: :func:`find_binaries`).
        extra_args: more kube-apiserver flags (later flags win).
        disable_admission_plugins: without a controller-manager no
            ServiceAccount "default" ever exists, so the ServiceAccount
            plugin would reject every Pod; pass ``()`` to keep it.
        service_cluster_ip_range: ``--service-cluster-ip-range`` (only
            allocation bookkeeping; nothing is routed).
        watch_cache: ``False`` sends every watch/list straight to etcd, so
            :meth:`APIServer.compact_etcd` alone makes old resourceVersions 410.
        etcd_progress_notify_interval: etcd ``--watch-progress-notify-interval``;
            the short default makes BOOKMARK events (sent ~2 s before a
            watch's timeout and about every minute) arrive reliably.
        ready_timeout: seconds to wait for ``/readyz``.
        die_with_parent: SIGKILL the children if this process dies
            (PR_SET_PDEATHSIG; tied to the *thread* that starts them, so
            start from a thread that outlives the server). A SIGKILLed test
            process still leaves its /tmp/netaccel-apiserver-* dir behind.
        keep_workdir: leave the temp dir (logs, certs) for debugging; the
            log paths named in errors are otherwise gone by the time you read
            them (the error message carries the log tail).
    """
    if kube_apiserver is None or etcd is None:
        found_api, found_etcd = find_binaries()
        kube_apiserver = kube_apiserver or found_api
        etcd = etcd or found_etcd
    workdir = Path(tempfile.mkdtemp(prefix="netaccel-apiserver-"))
    server: APIServer | None = None
    etcd_proc: _Process | None = None
    api_proc: _Process | None = None
    try:
        pki = make_pki(workdir / "pki")
        token = secrets.token_hex(24)
        tokens = workdir / "tokens.csv"
        tokens.write_text(f'{token},{ADMIN_USER},{ADMIN_USER},"{ADMIN_GROUP}"\n')
        tokens.chmod(0o600)
        ssl_ctx = ssl.create_default_context(cafile=str(pki["ca"]))

        for attempt in range(3):  # free ports can be taken between probe and bind
            etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
            etcd_url = f"http://127.0.0.1:{etcd_port}"
            peer_url = f"http://127.0.0.1:{peer_port}"
            data_dir = workdir / f"etcd-data-{attempt}"
            etcd_proc = _Process("etcd", [
                str(etcd),
                "--name=test",
                f"--data-dir={data_dir}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=test={peer_url}",
                "--listen-metrics-urls=",
                "--unsafe-no-fsync",  # test data; much faster on slow disks
                # Progress notifications tell kube-apiserver's watch cache the
                # current revision while its resource is quiet; without them
                # (etcd default 10m) watch bookmarks rarely come.
                f"--watch-progress-notify-interval={etcd_progress_notify_interval}",
                "--log-level=warn",
            ], workdir / "etcd.log", die_with_parent)
            etcd_proc.start()
            try:
                _wait_etcd(etcd_proc, etcd_url, 30)
            except APIServerError:
                etcd_proc.stop()
                if attempt < 2 and _port_clash(etcd_proc.log):
                    continue
                raise

            url = f"https://127.0.0.1:{api_port}"
            args = [
                str(kube_apiserver),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                f"--secure-port={api_port}",
                # The default is the host's first non-loopback address;
                # loopback keeps everything on 127.0.0.1, and with no
                # reconciler the (invalid) loopback Endpoints are not written.
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                f"--cert-dir={workdir / 'certs'}",
                f"--tls-cert-file={pki['cert']}",
                f"--tls-private-key-file={pki['key']}",
                f"--client-ca-file={pki['ca']}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki['sa_pub']}",
                f"--service-account-signing-key-file={pki['sa_key']}",
                "--authorization-mode=RBAC",
                f"--token-auth-file={tokens}",
                f"--service-cluster-ip-range={service_cluster_ip_range}",
                "--allow-privileged=true",
                "--profiling=false",
                f"--watch-cache={'true' if watch_cache else 'false'}",
                "--v=1",
            ]
            if disable_admission_plugins:
                args.append(f"--disable-admission-plugins={','.join(disable_admission_plugins)}")
            args.extend(extra_args)
            api_proc = _Process("kube-apiserver", args, workdir / "kube-apiserver.log",
                                die_with_parent)
            kubeconfig = workdir / "kubeconfig"
            _write_kubeconfig(kubeconfig, url, pki["ca"], token)
            server = APIServer(
                url=url, token=token, ca_file=pki["ca"], kubeconfig=kubeconfig, workdir=workdir,
                etcd_url=etcd_url, kube_apiserver_binary=Path(kube_apiserver),
                etcd_binary=Path(etcd),
                ready_timeout=ready_timeout, _etcd=etcd_proc, _apiserver=api_proc, _ssl=ssl_ctx,
            )
            api_proc.start()
            try:
                server.wait_ready()
            except APIServerError:
                server.stop()
                if attempt < 2 and _port_clash(api_proc.log):
                    continue
                raise
            break
        assert server is not None
        yield server
    finally:
        try:
            if server is not None:
                server.stop()
            else:
                for proc in (api_proc, etcd_proc):
                    if proc is not None:
                        proc.stop()
        finally:
            if not keep_workdir:
                shutil.rmtree(workdir, ignore_errors=True)
