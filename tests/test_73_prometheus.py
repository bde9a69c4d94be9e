"""A real Prometheus scrapes a live mount and answers a hit-ratio query; the shipped
recording rules and Grafana dashboard use only metrics the exporter serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.nfsserver import free_port
from tests.conftest import Export, MountFactory

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "contrib" / "prometheus" / "wancache-rules.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "wancache.json"
NEEDS = "the Debian package prometheus (scripts/bootstrap installs it)"


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """(config file to write, port) of a Prometheus started by `start_prometheus`."""
    if shutil.which("prometheus") is None:
        pytest.skip(f"no prometheus binary: install {NEEDS}")
    yield tmp_path / "prometheus.yml", free_port()


def start_prometheus(config: Path, port: int, target: int) -> subprocess.Popen[bytes]:
    config.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {RULES}
scrape_configs:
  - job_name: wancache
    static_configs:
      - targets: ["127.0.0.1:{target}"]
""")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}",
         f"--storage.tsdb.path={config.parent / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=(config.parent / "prometheus.log").open("wb"))
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("prometheus did not start: " +
                            (config.parent / "prometheus.log").read_text())
            time.sleep(0.1)


def query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    answer = http_json(url)
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def test_prometheus_scrapes_a_mount_and_answers_hit_ratios(
        prometheus: tuple[Path, int], mount_factory: MountFactory, export: Export) -> None:
    config, port = prometheus
    for i in range(5):
        (export.path / f"f{i}").write_bytes(b"p" * 1000)
    target = free_port()
    m = mount_factory([f"metrics=127.0.0.1:{target}"])
    for i in range(5):
        (m.mountpoint / f"f{i}").read_bytes()
    proc = start_prometheus(config, port, target)
    try:
        mount = str(m.mountpoint)
        sel = f'cache="attr",mount="{mount}"'
        ratio = (f'sum by (mount) (wancache_cache_requests_total{{{sel},result="hit"}})'
                 f' / sum by (mount) (wancache_cache_requests_total{{{sel}}})')
        rule = f'wancache:cache_hit_ratio:total{{cache="attr",mount="{mount}"}}'
        deadline = time.monotonic() + 30
        while not (query(port, ratio) and query(port, rule)):
            assert time.monotonic() < deadline, "prometheus never had the hit ratio"
            time.sleep(0.25)
        [direct] = query(port, ratio)
        assert direct["metric"]["mount"] == mount
        assert 0.0 <= float(direct["value"][1]) <= 1.0
        [recorded] = query(port, rule)
        assert 0.0 <= float(recorded["value"][1]) <= 1.0
        [up] = query(port, f'wancache_server_up{{mount="{mount}"}}')
        assert up["value"][1] == "1"
        reads = query(port, f'wancache_rpc_calls_total{{mount="{mount}",proc="READ"}}')
        assert reads and float(reads[0]["value"][1]) >= 1
    finally:
        proc.terminate()
        proc.wait(20)


def test_rules_check_with_promtool() -> None:
    if shutil.which("promtool") is None:
        pytest.skip(f"no promtool: install {NEEDS}")
    proc = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _names_in(expr: str) -> set[str]:
    return {n for n in re.findall(r"\b(wancache[a-z_:]*[a-z0-9])\b", expr)
            if not n.startswith("wancache:")} | \
        set(re.findall(r"\b(wancache:[a-z0-9_:]+)\b", expr))


def test_rules_and_dashboard_use_exported_metrics(mount_factory: MountFactory,
                                                  export: Export) -> None:
    (export.path / "f").write_bytes(b"x")
    target = free_port()
    m = mount_factory([f"metrics=127.0.0.1:{target}"])
    (m.mountpoint / "f").read_bytes()
    with urllib.request.urlopen(f"http://127.0.0.1:{target}/metrics", timeout=10) as r:
        text = r.read().decode()
    exported = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    rules_text = RULES.read_text()
    recorded = set(re.findall(r"record: (\S+)", rules_text))
    known = exported | recorded
    used_in_rules = set()
    for expr in re.findall(r"expr: ?\|?\n?((?:.|\n)*?)(?=\n\s*(?:-|labels:|for:|$))",
                           rules_text):
        used_in_rules |= _names_in(expr)
    assert "wancache_cache_requests_total" in used_in_rules
    assert used_in_rules - known == set()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    used = set().union(*(_names_in(e) for e in exprs))
    assert used - known == set()
    assert "wancache:cache_hit_ratio:rate5m" in used
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"instance", "mount"}
