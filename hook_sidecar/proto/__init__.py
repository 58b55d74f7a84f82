"""KubeVirt hook protocol: .proto sources and their committed generated modules.

Regenerate with ``python -m hook_sidecar.proto.generate`` (needs grpcio-tools).
"""
