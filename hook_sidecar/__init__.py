"""netaccel's KubeVirt hook sidecar: virtio-net checksum offload off in the domain XML.

The edit core (errors, settings, domain, shim) uses the standard library only, so that it
also runs in KubeVirt's stock sidecar-shim image; the gRPC server (server, cli) sits apart.
"""

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("netaccel")
except (ImportError, PackageNotFoundError):  # bundled into the shim script, not installed
    __version__ = "0+unknown"
