"""The Prometheus exporter of a live mount: names, labels, values, and what it must not
show; `-o debug` logs every RPC, and nothing logs file contents."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from bench.nfsserver import free_port
from tests.conftest import Export, MountFactory
from wancache.config import Config
from wancache.nfs_backend.stats import LATENCY_BUCKETS

REQUIRED = {
    "wancache_cache_requests": "counter", "wancache_rpc_calls": "counter",
    "wancache_rpc_errors": "counter", "wancache_rpc_duration_seconds": "histogram",
    "wancache_read_bytes": "counter", "wancache_dirty_bytes": "gauge",
    "wancache_writeback_pending_ops": "gauge", "wancache_writeback_oldest_seconds": "gauge",
    "wancache_server_up": "gauge", "wancache_cache_bytes": "gauge",
    "wancache_cache_evictions": "counter", "wancache_conflicts": "counter",
    "wancache_lost": "counter",
}


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return str(r.read().decode())


def samples(text: str) -> dict[str, list[Sample]]:
    """family name -> samples (and the family's type under 'type:<name>')."""
    out: dict[str, list[Sample]] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = list(fam.samples)
        out["type:" + fam.name] = fam.type  # type: ignore[assignment]
    return out


def value(fams: dict[str, list[Sample]], sample: str, **labels: str) -> float:
    family = next(n for n in fams if not n.startswith("type:") and sample.startswith(n))
    found = [s.value for s in fams[family] if s.name == sample and
             all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (sample, labels, found)
    return found[0]


def test_exporter_serves_every_required_metric_with_the_mount_label(
        mount_factory: MountFactory, export: Export) -> None:
    (export.path / "data").write_bytes(b"x" * 300_000)
    port = free_port()
    m = mount_factory([f"metrics=127.0.0.1:{port}"])
    assert (m.mountpoint / "data").read_bytes() == b"x" * 300_000
    (m.mountpoint / "written").write_bytes(b"y" * 1000)
    fams = samples(scrape(port))
    for name, kind in REQUIRED.items():
        assert fams.get("type:" + name) == kind, name
    mount = str(m.mountpoint)
    for name in REQUIRED:
        assert all(s.labels["mount"] == mount for s in fams[name]), name
    for cache in ("attr", "block"):
        for result in ("hit", "miss"):
            assert value(fams, "wancache_cache_requests_total", cache=cache,
                         result=result) >= 0
    assert value(fams, "wancache_cache_requests_total", cache="block", result="miss") >= 1
    assert value(fams, "wancache_rpc_calls_total", program="nfs3", proc="READ") >= 1
    assert value(fams, "wancache_read_bytes_total", source="server") >= 300_000
    assert value(fams, "wancache_server_up") == 1
    assert value(fams, "wancache_conflicts_total") == 0
    assert value(fams, "wancache_lost_total") == 0
    # The histogram: cumulative buckets from RpcStats, +Inf == count.
    calls = value(fams, "wancache_rpc_calls_total", program="nfs3", proc="GETATTR")
    buckets = [s for s in fams["wancache_rpc_duration_seconds"]
               if s.name.endswith("_bucket") and s.labels["proc"] == "GETATTR"]
    assert [float(s.labels["le"]) for s in buckets] == [*LATENCY_BUCKETS, float("inf")]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts)
    assert counts[-1] == value(fams, "wancache_rpc_duration_seconds_count", proc="GETATTR")
    assert 1 <= counts[-1] <= calls
    # What the exporter says is what the daemon says.
    stats = m.request("stats")
    assert value(fams, "wancache_rpc_calls_total", program="nfs3", proc="READ") == \
        stats["rpc"]["nfs3.READ"]
    # The block cache fills in the background.
    deadline = time.monotonic() + 10
    while value(samples(scrape(port)), "wancache_cache_bytes") < 300_000:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # Only /metrics (and /) is served.
    with pytest.raises(urllib.error.HTTPError) as err:
        scrape(port, "/nothing")
    assert err.value.code == 404
    assert "wancache_info" in scrape(port, "/")


def test_default_metrics_address_is_loopback() -> None:
    assert Config().metrics.startswith("127.0.0.1:")


def test_metrics_off_and_port_in_use(mount_factory: MountFactory, export: Export,
                                     allow_log_warnings: None) -> None:
    (export.path / "f").write_bytes(b"still served")
    off = mount_factory(["metrics=off"], name="off")
    assert off.request("status")["metrics"] == ""
    # The port is taken: the mount comes up anyway, with one warning.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        busy = mount_factory([f"metrics=127.0.0.1:{port}"], name="busy")
        assert (busy.mountpoint / "f").read_bytes() == b"still served"
        assert busy.request("status")["metrics"] == ""
    warnings = [ln for ln in busy.log().splitlines() if "WARNING" in ln]
    assert len(warnings) == 1, warnings
    assert f"cannot listen on 127.0.0.1:{port}" in warnings[0]
    assert "without metrics" in warnings[0]


def test_debug_logs_every_rpc_and_nothing_shows_file_contents(
        mount_factory: MountFactory, export: Export) -> None:
    secret = b"TOP-SECRET-CONTENT-4f1c9a"
    (export.path / "plain").write_bytes(secret)
    port = free_port()
    quiet = mount_factory([f"metrics=127.0.0.1:{port}"], name="quiet")
    assert (quiet.mountpoint / "plain").read_bytes() == secret
    assert "rpc nfs3." not in quiet.log()           # no per-RPC lines without debug
    assert secret.decode() not in scrape(port)
    quiet.unmount()
    loud = mount_factory(["debug", "metrics=off"], name="loud")
    assert (loud.mountpoint / "plain").read_bytes() == secret
    (loud.mountpoint / "new").write_bytes(secret)
    loud.flush()
    log = loud.log()
    for proc in ("nfs3.GETATTR", "nfs3.READ", "nfs3.WRITE"):
        assert f"rpc {proc} xid=" in log, proc
    assert secret.decode() not in log
    assert secret.hex() not in log


def test_readme_documents_the_metrics() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name, kind in REQUIRED.items():
        shown = name + "_total" if kind == "counter" else name
        assert shown in readme, shown
