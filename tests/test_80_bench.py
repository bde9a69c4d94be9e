"""The bench runs end to end (`--quick`) and reports sane numbers; never timings."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import report
from bench.run import CONFIGS, MOUNT_OPTIONS
from bench.wanem import PROFILES
from bench.workloads import (
    QUICK,
    QUICK_WORKLOADS,
    WORKLOADS,
    Result,
    Step,
    op_dbench,
    op_parallel_read,
)

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def quick_steps() -> list[tuple[str, str, bool, str]]:
    """(workload, step, has a libnfs equivalent, row label) of every --quick step."""
    out = []
    for name in QUICK_WORKLOADS:
        w = WORKLOADS[name]
        for s in w.steps(QUICK):
            if s.quick:
                out.append((name, s.name, s.libnfs, f"{w.title(QUICK)}: {s.label}"))
    return out


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    proc = bench("--quick", "--out", str(out), timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return out, proc.stdout


@pytest.mark.slow
def test_quick_json_has_every_step_and_config(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    data = json.loads((out / "latest.json").read_text())
    assert list(out.glob("bench-branch-*.json"))
    assert data["profile"] == "branch" and data["quick"] is True
    rows = {(r["workload"], r["step"], r["config"]): r for r in data["rows"]}
    expected = {(w, s, c) for w, s, _, _ in quick_steps() for c in CONFIGS}
    assert set(rows) == expected
    for (w, s, config), r in rows.items():
        libnfs = next(lib for ww, ss, lib, _ in quick_steps() if (ww, ss) == (w, s))
        if config == "libnfs" and not libnfs:
            assert r["status"] == "n/a", r
            continue
        assert r["status"] in ("ok", "timeout"), r
        if config == "limit":
            assert r["seconds"] >= 0 and r["rpcs"] is None
        elif config == "floor":     # the pass-through of a local directory: no RPCs
            assert r["seconds"] > 0 and r["rpcs"] is None and r["peak_rss"] > 0, r
            assert r["floor_ratio"] == 1, r
        else:
            assert r["seconds"] > 0, r
            assert r["rpcs"] is not None and r["rpcs"] >= 0, r
            assert all(n >= 0 for n in r["rpcs_by_proc"].values()), r
        if config in MOUNT_OPTIONS:
            assert r["peak_rss"] > 0, r
        for key in ("speedup", "fraction", "rate", "t_eff", "floor_ratio"):
            assert r[key] is None or (math.isfinite(r[key]) and r[key] >= 0), (key, r)
    # Each configuration actually ran (or was computed) somewhere.
    for config in CONFIGS:
        assert any(r["status"] in ("ok", "timeout") for (_, _, c), r in rows.items()
                   if c == config), config
    baseline = [r for (_, _, c), r in rows.items() if c == "cache=off"]
    assert all(r["speedup"] == 1 for r in baseline if r["status"] == "ok")


@pytest.mark.slow
def test_quick_chart_is_a_png(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    png = out / "bench-branch.png"
    assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_quick_table_has_expected_rows(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    lines = stdout.splitlines()
    assert lines[0].startswith("wancache bench: profile branch")
    assert lines[1].startswith("machine: ") and "cores" in lines[1] and "Python" in lines[1]
    header = next(line for line in lines if line.startswith("workload"))
    for column in ("config", "time", "x pass-through", "x floor", "of limit", "RPCs",
                   "peak RSS", "target"):
        assert column in header
    for _, _, _, label in quick_steps():
        i = next(i for i, line in enumerate(lines) if line.startswith(label + " "))
        group = [lines[i][len(label):], *lines[i + 1:i + len(CONFIGS)]]
        assert [g.split()[0] for g in group] == list(CONFIGS), group
    # The markdown table of the same run, from its JSON.
    md = subprocess.run([sys.executable, "-m", "bench.report", str(out / "latest.json"),
                         "--markdown"], cwd=REPO, capture_output=True, text=True,
                        timeout=60, check=True).stdout
    assert "| workload | config | time |" in md
    for _, _, _, label in quick_steps():
        assert f"| {label} |" in md


@pytest.mark.parametrize("args", [["--profile", "mars"], ["--only", "nope"],
                                  ["--configs", "wancache,nfs4"], ["--mbit", "0"],
                                  ["--rtt-ms", "abc"], ["--bogus"]])
def test_bad_arguments_exit_2_with_one_line(args: list[str]) -> None:
    proc = bench(*args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "error" in proc.stderr


def test_parallel_read_reads_every_file_at_once(tmp_path: Path) -> None:
    paths = []
    for i in range(16):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes([i]) * (100_000 + i))
        paths.append(str(p))
    assert op_parallel_read({"paths": paths, "chunk": 1 << 16}, math.inf) == \
        sum(100_000 + i for i in range(16))


def test_dbench_reports_its_throughput(tmp_path: Path) -> None:
    done, seconds = op_dbench({"dir": str(tmp_path), "clients": 2, "seconds": 2},
                              time.monotonic() + 60)
    assert seconds == 2 and done > 0


def _steps(name: str) -> list[tuple[str, Step]]:
    w = WORKLOADS[name]
    return [(w.title(QUICK), s) for s in w.steps(QUICK)]


def test_dbench_target_is_the_floor_on_lan_only() -> None:
    """A time-bound step's rate is what it did; the target compares it with the floor."""
    steps = _steps("dbench")
    results = [Result("dbench", "run", "wancache", "ok", 6.0, 60_000_000),
               Result("dbench", "run", "floor", "ok", 6.0, 120_000_000),
               Result("dbench", "run", "cache=off", "timeout", 11.0, 0)]
    configs = ["wancache", "cache=off", "floor", "limit"]
    rows = {r.config: r for r in report.derive(results, steps, PROFILES["lan"], configs,
                                                 "lan")}
    assert rows["wancache"].rate == 10e6 and rows["floor"].rate == 20e6
    assert rows["wancache"].floor_ratio == 0.5 and rows["floor"].floor_ratio == 1
    assert rows["cache=off"].rate is None
    assert rows["wancache"].target_met is False and "0.50x" in rows["wancache"].target_note
    branch = {r.config: r for r in report.derive(results, steps, PROFILES["branch"],
                                                   configs, "branch")}
    assert branch["wancache"].target_met is None
