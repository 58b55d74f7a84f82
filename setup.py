"""The packages of the `netaccel` distribution (the metadata is in pyproject.toml).

The agent's C sources live in bpf/ at the top of the tree and ship as `node_helper.bpf`.
An image context holds only the parts its image needs (the hook image: pyproject.toml,
setup.py and hook_sidecar/), so the build takes the packages whose folders are present.
"""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
PACKAGE_DIRS = {
    "hook_sidecar": "hook_sidecar",
    "hook_sidecar.proto": "hook_sidecar/proto",
    "node_helper": "node_helper",
    "node_helper.vm": "node_helper/vm",
    "node_helper.bpf": "bpf",
}
present = {name: folder for name, folder in PACKAGE_DIRS.items() if (HERE / folder).is_dir()}
setup(packages=sorted(present), package_dir=present)
