"""The lab: a node made of network namespaces, QEMU guests and benchmarks.

Never shipped on a node and never imported by node_helper: the lab imports the agent, not
the other way round (tests/test_layout.py checks it).
"""
