"""Pure parts of the benchmark: qperf output parsing, ABBA order, table, JSON, plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab import bench
from lab.bench import BenchError, Row

QPERF_LAT = """tcp_lat:
    latency   =  29.9 us
    msg_size  =     1 KB
    time      =     1 sec
"""
QPERF_BW = """tcp_bw:
    bw        =  1.89 GB/sec
    msg_size  =    16 KB
"""
QPERF_UDP_BW = """udp_bw:
    send_bw   =  120 MB/sec
    recv_bw   =  96.5 MB/sec
"""


def test_parse_qperf_units() -> None:
    assert bench.parse_qperf("tcp_lat", QPERF_LAT) == pytest.approx(29.9)
    assert bench.parse_qperf("tcp_bw", QPERF_BW) == pytest.approx(1890.0)
    assert bench.parse_qperf("udp_lat", "latency = 1.5 ms") == pytest.approx(1500.0)
    # udp_bw: what arrived counts, not what was sent
    assert bench.parse_qperf("udp_bw", QPERF_UDP_BW) == pytest.approx(96.5)


def test_parse_qperf_errors_say_what_is_wrong() -> None:
    with pytest.raises(BenchError, match="no latency"):
        bench.parse_qperf("tcp_lat", "qperf: failed to connect")
    with pytest.raises(BenchError, match="unknown unit"):
        bench.parse_qperf("tcp_bw", "bw = 3 furlongs/sec")


def test_alternate_is_abba() -> None:
    assert bench.alternate(["a", "b"], 0) == ["a", "b"]
    assert bench.alternate(["a", "b"], 1) == ["b", "a"]


def _rows() -> list[Row]:
    return [
        Row("tcp_lat", 64, "us", 20.0, 11.0, 10.0, 0.55),
        Row("tcp_bw", 16384, "MB/s", 800.0, 1800.0, 2400.0, 2.25),
    ]


def test_table_has_ratio_and_floor_columns() -> None:
    table = bench.format_table(_rows()).splitlines()
    assert table[0].split() == ["test", "size", "unit", "baseline", "accelerated", "floor",
                                "ratio", "vs", "floor"]
    assert table[1].split() == ["tcp_lat", "64B", "us", "20.00", "11.00", "10.00", "0.55x",
                                "1.10x"]
    assert table[2].split()[1] == "16K"


def test_json_rows_have_the_issue_shape(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    bench.write_json(_rows(), out, {"kernel": "x"})
    doc = json.loads(out.read_text())
    assert doc["meta"] == {"kernel": "x"}
    assert set(doc["rows"][0]) == {"test", "msg_size", "unit", "baseline", "accelerated",
                                   "floor", "ratio"}
    vm_row = Row("udp_bw", 1024, "MB/s", 100.0, 130.0, None, 1.3, "mirror").as_json()
    assert vm_row["variant"] == "mirror" and vm_row["floor"] is None


def test_plot_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    rows = _rows() + [Row("tcp_lat", 1024, "us", 21.0, 12.0, 11.0, 0.57)]
    bench.plot(rows, out, "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unix_floor_tool_measures() -> None:
    lat = bench.run_unix_floor("tcp_lat", 64, 0.2)
    bw = bench.run_unix_floor("tcp_bw", 16384, 0.2)
    assert 0 < lat < 10_000  # microseconds, one way
    assert bw > 1  # MB/s


def test_testbed_for_hands_the_blocks_error_to_the_caller(monkeypatch) -> None:  # noqa: ANN001
    """An error inside the block (here a TestbedError, the type testbed_for itself expects
    from find()) reaches the caller as it is."""
    from lab import bench
    from lab.testbed import TestbedError

    up = bench.Testbed(number=1)
    up.pods = [up._pod(0), up._pod(1)]  # described only: no namespaces
    monkeypatch.setattr(bench.Testbed, "find", classmethod(lambda cls, number=None: up))
    with pytest.raises(TestbedError, match="from the block"), bench.testbed_for(pods=2) as bed:
        assert bed is up
        raise TestbedError("from the block")
