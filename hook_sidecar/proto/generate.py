"""Regenerate the committed ``*_pb2.py`` / ``*_pb2_grpc.py`` modules from the .proto files.

The include root is the repository root, so the generated modules import each other
as ``hook_sidecar.proto.xxx`` and the descriptor pool sees distinct file names
(``hook_sidecar/proto/api_v1alpha1.proto`` ...). Usage::

    python -m hook_sidecar.proto.generate [--out DIR]

``--out`` writes the modules into ``DIR/hook_sidecar/proto/`` instead of in place
(the test uses it to check the committed files are up to date).
"""

import argparse
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent.parent
PROTOS = ("api_info.proto", "api_v1alpha1.proto", "api_v1alpha2.proto", "api_v1alpha3.proto")


def generate(out_root: Path = ROOT) -> list[Path]:
    """Run protoc on the four .proto files; return the generated module paths."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    rel = [f"hook_sidecar/proto/{name}" for name in PROTOS]
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        *rel,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    out = out_root / "hook_sidecar" / "proto"
    return sorted(out / f"{Path(p).stem}{suffix}" for p in PROTOS for suffix in
                  ("_pb2.py", "_pb2_grpc.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
