"""Shim mode: the single-file script runs on a bare python3, and `netaccel-hook edit`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from hook_sidecar import shim
from hook_sidecar.domain import edit_domain

from .conftest import REPO, console_script, domain, vmi_json

#: Debian's python3 (what a sidecar-shim-like image has), and older ones when present.
PYTHONS = ["/usr/bin/python3"] + [
    p for p in ("/root/.pyenv/versions/3.9.18/bin/python3",
                "/root/.pyenv/versions/3.8.18/bin/python3") if Path(p).exists()]
CONFIGMAP = REPO / "examples" / "vmi" / "netaccel-hook-shim-configmap.yaml"


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle alone in an empty directory: nothing else importable."""
    path = tmp_path_factory.mktemp("shim") / "onDefineDomain"
    path.write_text(shim.bundle())
    path.chmod(0o755)
    return path


def _run(python: str, script: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    # -I: isolated (no PYTHONPATH, no user site); -S: no site-packages at all
    return subprocess.run([python, "-I", "-S", str(script), *args], capture_output=True,
                          cwd=script.parent, env={"PATH": os.environ["PATH"]}, timeout=30)


@pytest.mark.parametrize("python", PYTHONS)
def test_bundle_runs_on_bare_python(script: Path, python: str) -> None:
    xml, vmi = domain("multus"), vmi_json()
    res = _run(python, script, "--vmi", vmi.decode(), "--domain", xml.decode())
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == edit_domain(xml, vmi)
    assert res.stderr == b""


def test_bundle_reports_bad_input_on_stderr(script: Path) -> None:
    res = _run(PYTHONS[0], script, "--vmi", vmi_json().decode(), "--domain", "<domain>")
    assert res.returncode == 1 and res.stdout == b""
    assert res.stderr.startswith(b"netaccel onDefineDomain: VMI default/testvmi: domain XML "
                                 b"is not well-formed (truncated?)")
    res = _run(PYTHONS[0], script, "--domain", "<domain/>")
    assert res.returncode == 2 and b"--vmi" in res.stderr


def test_bundle_imports_only_the_standard_library(script: Path) -> None:
    """Without the repo or any site-packages, nothing but stdlib modules get imported."""
    probe = script.parent / "probe.py"
    probe.write_text(
        "import runpy, sys\n"
        "sys.argv = ['onDefineDomain', '--vmi', '{}', '--domain', '<domain/>']\n"
        "before = set(sys.modules)\n"
        "try:\n    runpy.run_path('onDefineDomain', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "bad = sorted(m for m in new if m not in sys.stdlib_module_names\n"
        "             and m != 'hook_sidecar')\n"
        "print('\\n' + repr(bad))\n")
    res = subprocess.run(["/usr/bin/python3", "-I", "-S", str(probe)], capture_output=True,
                         cwd=script.parent, timeout=30)
    assert res.stdout.strip().splitlines()[-1] == b"[]", res.stderr.decode()


def test_example_configmap_carries_the_current_bundle() -> None:
    manifest = yaml.safe_load(CONFIGMAP.read_text())
    assert manifest["kind"] == "ConfigMap"
    assert manifest["metadata"]["name"] == "netaccel-hook-shim"
    assert manifest["data"][shim.SCRIPT_KEY] == shim.bundle(), (
        "regenerate: netaccel-hook shim-script --configmap netaccel-hook-shim "
        "-o examples/vmi/netaccel-hook-shim-configmap.yaml")
    assert CONFIGMAP.read_text() == shim.configmap("netaccel-hook-shim")


def test_cli_edit_and_shim_script(tmp_path: Path) -> None:
    (tmp_path / "d.xml").write_bytes(domain("single"))
    (tmp_path / "v.json").write_bytes(vmi_json())
    hook = str(console_script("netaccel-hook"))
    res = subprocess.run([hook, "edit", "--vmi", str(tmp_path / "v.json"), "--domain",
                          str(tmp_path / "d.xml")], capture_output=True, timeout=30)
    assert res.returncode == 0 and res.stdout == edit_domain(domain("single"), vmi_json())

    bad = json.dumps({"metadata": {"annotations": {
        "netaccel.kubevirt.io/checksum-offload": "maybe"}}})
    res = subprocess.run([hook, "edit", "--vmi", "-", "--domain", str(tmp_path / "d.xml")],
                         input=bad.encode(), capture_output=True, timeout=30)
    assert res.returncode == 1 and res.stdout == b""
    assert b"checksum-offload='maybe' is not allowed" in res.stderr

    res = subprocess.run([hook, "edit", "--vmi", str(tmp_path / "nope"), "--domain",
                          str(tmp_path / "d.xml")], capture_output=True, timeout=30)
    assert res.returncode == 2 and b"No such file" in res.stderr

    out = tmp_path / "onDefineDomain"
    assert subprocess.run([hook, "shim-script", "-o", str(out)], timeout=30).returncode == 0
    assert out.read_text() == shim.bundle() and os.access(out, os.X_OK)
