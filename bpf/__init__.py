"""The eBPF C programs, shipped inside the node_helper package as `node_helper.bpf`.

pyproject.toml maps this folder to that package, so an installed agent finds the sources
with importlib.resources (node_helper.kernel.bpf_source), in a wheel as in a checkout.
"""
