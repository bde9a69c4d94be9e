"""The soak (bench/soak.py): three minutes of real load through the WAN emulator with
two faults, in the default run.  It is honest: it fails when wancache loses an
acknowledged byte, returns a wrong one, or breaks a bound (daemon RSS, cache_dir)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.soak_faults import FAULTS, plan
from bench.soak_verify import Entry, compare, excuse
from bench.soak_workloads import check_shared, shared_content

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOOLS = ("dbench", "fio", "git", "tar", "cp", "diff", "setpriv", "chattr", "mkfs.ext4",
         "nfs-cat")


def soak(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench.soak", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_two_minute_soak_with_two_faults(tmp_path: Path) -> None:
    for tool in TOOLS:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (scripts/bootstrap installs it)")
    proc = soak("--minutes", "2", "--faults", "outage,kill", "--out", str(tmp_path),
                timeout=690)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    res = json.loads((tmp_path / "latest.json").read_text())
    assert (tmp_path / "soak-branch.png").read_bytes()[:8] == PNG_MAGIC
    failed = [f"{c['name']}: {c['detail']}" for c in res["checks"] if not c["ok"]]
    assert not failed, "\n".join(failed) + "\n\n" + proc.stdout[-4000:]
    assert proc.returncode == 0
    # Every check passed: make sure they had something to check.
    assert {e["name"] for e in res["events"]} >= {"kill", "outage"}, res["events"]
    assert res["samples"], "the sampler recorded nothing"
    assert sum(d["bytes"] for d in res["diffs"]) > 0, "nothing was acknowledged"


@pytest.mark.parametrize("args", [["--minutes", "0"], ["--profile", "mars"],
                                  ["--faults", "meteor"], ["--workloads", "tetris"],
                                  ["--cache-size", "lots"], ["--bogus"]])
def test_bad_arguments_exit_2_with_one_line(args: list[str]) -> None:
    proc = soak(*args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "error" in proc.stderr


def test_faults_never_overlap_and_leave_a_quiet_tail() -> None:
    names = list(FAULTS)
    for seconds in (180.0, 1800.0):
        schedule = plan(names, seconds)
        assert {f.name for _, f in schedule} == set(names) or seconds < 600
        ends = 0.0
        for start, fault in schedule:
            assert start >= ends, "faults overlap"
            ends = start + fault.hold + fault.gap
        last_start, last = schedule[-1]
        assert last_start + last.hold <= seconds - 30


def test_shared_versions_are_checked_whole() -> None:
    data = shared_content("s01.dat", 7)
    assert check_shared(data) == ""
    assert check_shared(data[:-1])
    assert check_shared(shared_content("s01.dat", 6)[:100] + data[100:])
    assert check_shared(b"")


def _file(digest: str, size: int = 3) -> Entry:
    return Entry("file", 0o644, 0, 0, size, 1, digest)


def test_compare_counts_lost_bytes_and_extras() -> None:
    want = {"r1": Entry("dir", 0o755, 0, 0), "r1/a": _file("x", 10), "r1/b": _file("y", 20)}
    have = {"r1": Entry("dir", 0o755, 0, 0), "r1/a": _file("x", 10), "r1/b": _file("z", 20),
            "r1/c": _file("q")}
    d = compare("area", want, have)
    assert d.lost_bytes == 20 and d.extra == ["r1/c"] and len(d.changed) == 1
    assert not d.equal
    del have["r1/b"]
    assert compare("area", want, have).missing == ["r1/b"]


def test_a_failed_steps_scope_is_excused_and_nothing_else() -> None:
    want = {"r1": Entry("dir", 0o755, 0, 0), "r1/x": Entry("dir", 0o755, 0, 0),
            "r1/x/a": _file("x"), "r1/out.tar": _file("t"), "r2/k": _file("k")}
    have = {"r1": Entry("dir", 0o755, 0, 0), "r1/x": Entry("dir", 0o755, 0, 0),
            "r1/x/a": _file("x"), "r1/out.tar.partial": _file("p"), "r2/k": _file("k"),
            "r2/extra": _file("e")}
    w, h = excuse(want, have, "r1", ["out.tar"])
    d = compare("area", w, h)
    assert d.missing == [] and d.extra == ["r2/extra"], d
    w, h = excuse(want, have, "r1", ["x"])
    assert compare("area", w, h).missing == ["r1/out.tar"]
