"""`wancache status/flush/prefetch/pin/unpin/evict` against live mounts, the README's
options table, and root-only files of a live mount."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Export, MountFactory
from wancache import config, control

REPO = Path(__file__).resolve().parent.parent
WANCACHE = [sys.executable, "-m", "wancache.cli"]
MiB = 1 << 20


@pytest.fixture(autouse=True)
def run_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Control sockets of this test's mounts only (mount daemons inherit it); short,
    as socket paths are."""
    path = Path(tempfile.mkdtemp(prefix="wc-", dir="/tmp"))
    monkeypatch.setenv(control.RUN_DIR_ENV, str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wancache(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*WANCACHE, *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                          cwd="/")


def ok_json(*args: str) -> Any:
    proc = wancache(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("wancache: ")
    return lines[0]


def test_readme_options_table_is_current() -> None:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- options -->\n(.*?)\n<!-- /options -->", text, re.DOTALL)
    assert m, "README.md has no <!-- options --> ... <!-- /options --> section"
    assert m.group(1).strip() == config.options_table().strip(), \
        "README options table is stale: replace it with `wancache options --markdown`"


def test_status_of_one_and_all_mounts(mount_factory: MountFactory, export: Export,
                                      run_dir: Path) -> None:
    (export.path / "f").write_bytes(b"abc")
    m = mount_factory(["metrics=off", "acregmin=2", "acregmax=20"])
    assert (m.mountpoint / "f").read_bytes() == b"abc"
    st = ok_json("status", str(m.mountpoint))
    assert st["mountpoint"] == str(m.mountpoint)
    assert st["server"] == export.spec
    assert st["state"] == "up"
    assert st["leases"]["files"] == [2.0, 20.0]
    assert st["writeback"]["pending_ops"] == 0
    assert st["cache"]["used_bytes"] >= 0 and st["cache"]["size_bytes"] == 10 << 30
    assert 0 <= st["hit_ratio"]["attr"] <= 1
    assert st["metrics"] == ""
    # a path inside the mount names the mount too
    assert ok_json("status", str(m.mountpoint / "f"))["pid"] == st["pid"]
    human = wancache("status", str(m.mountpoint))
    assert human.returncode == 0
    assert f"{m.mountpoint}  {export.spec}  up" in human.stdout
    assert "hit ratios  attributes" in human.stdout
    # all mounts: one with a long path (its socket is named by a hash), and a dead
    # daemon's socket
    long = mount_factory(["metrics=off"], name="m" * 80)
    assert control.socket_path(long.mountpoint).name.startswith("~")
    (run_dir / "gone_mount.sock").touch()
    proc = wancache("status", "--json")
    assert proc.returncode == 1       # one mount is down
    listed = {s["mountpoint"]: s for s in json.loads(proc.stdout)}
    assert listed[str(m.mountpoint)]["state"] == "up"
    assert listed[str(long.mountpoint)]["state"] == "up"
    assert ok_json("status", str(long.mountpoint / "f"))["mountpoint"] == str(long.mountpoint)
    assert listed["/gone/mount"]["state"] == "down"
    assert "down" in wancache("status").stdout


def test_flush_waits_until_the_server_has_everything(mount_factory: MountFactory,
                                                     export: Export) -> None:
    m = mount_factory(["metrics=off", "writeback_delay=60"])
    for i in range(5):
        (m.mountpoint / f"w{i}").write_bytes(b"z" * 100_000)
    st = ok_json("status", str(m.mountpoint))
    assert st["writeback"]["pending_ops"] >= 5
    assert st["writeback"]["dirty_bytes"] >= 500_000
    assert not (export.raw_path / "w4").exists()        # held back by writeback_delay
    # progress lines on the control socket, then the result
    it = control.request_iter(m.mountpoint, "flush")
    progress = []
    while True:
        try:
            progress.append(next(it))
        except StopIteration as stop:
            result = stop.value
            break
    assert progress and progress[0]["pending"] >= 5 and progress[0]["total"] >= 5
    assert result["pending"] == 0 and result["flushed"] >= 5
    assert (export.raw_path / "w4").read_bytes() == b"z" * 100_000
    (m.mountpoint / "late").write_bytes(b"late")
    out = ok_json("flush", str(m.mountpoint))
    assert out["pending"] == 0 and out["flushed"] >= 1
    assert (export.raw_path / "late").read_bytes() == b"late"
    proc = wancache("flush", str(m.mountpoint))
    assert proc.returncode == 0 and "nothing to flush" in proc.stdout
    # a client that hangs up mid-flush costs the daemon nothing (and logs no error)
    (m.mountpoint / "more").write_bytes(b"m")
    it = control.request_iter(m.mountpoint, "flush")
    assert next(it)["pending"] >= 1
    it.close()
    time.sleep(1.2)
    assert ok_json("status", str(m.mountpoint))["state"] == "up"


def _tree(root: Path) -> int:
    total = 0
    for d in ("a", "a/b", "c"):
        (root / d).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            data = os.urandom(50_000 * (i + 1))
            (root / d / f"f{i}").write_bytes(data)
            total += len(data)
    return total


def test_prefetch_warms_metadata_and_data(mount_factory: MountFactory,
                                          export: Export) -> None:
    total = _tree(export.path / "tree")
    m = mount_factory(["metrics=off"])
    tree = m.mountpoint / "tree"
    m.reset_rpc_calls()
    meta = ok_json("prefetch", "--metadata-only", str(tree))
    assert meta["directories"] == 4 and meta["files"] == 9 and meta["bytes"] == 0
    assert m.rpc_calls()["READ"] == 0
    data = ok_json("prefetch", str(tree))
    assert data["files"] == 9 and data["bytes"] == total and data["errors"] == 0
    # everything is now local: reading the tree again asks the server for no data
    m.drop_kernel_caches()
    m.reset_rpc_calls()
    for path in sorted(tree.rglob("f*")):
        path.read_bytes()
    assert m.rpc_calls()["READ"] == 0
    human = wancache("prefetch", str(tree / "a" / "f0"))
    assert human.returncode == 0
    assert human.stdout.startswith("prefetched 0 directories, 1 files")
    assert "not in a wancache mount" in one_line_error(wancache("prefetch", "/tmp"))
    assert "No such file" in one_line_error(wancache("prefetch", str(tree / "nope")))


def cached(m: Any, path: str) -> dict[str, Any]:
    return dict(m.request("cached", path=path))


def wait_cached(m: Any, path: str, timeout: float = 10) -> dict[str, Any]:
    """Cache state of `path` once all its blocks are stored (puts run in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        info = cached(m, path)
        if info["cached_blocks"] == info["blocks"] or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def test_pinned_files_stay_cached_and_fresh(mount_factory: MountFactory,
                                            export: Export) -> None:
    (export.path / "keep").write_bytes(b"1" * (2 * MiB))
    others = export.path / "others"
    others.mkdir()
    for i in range(8):
        (others / f"o{i}").write_bytes(os.urandom(MiB))
    m = mount_factory(["metrics=off", "cache_size=4M", "block_size=1M", "actimeo=1"])
    pinned = ok_json("pin", str(m.mountpoint / "keep"))
    assert pinned[str(m.mountpoint / "keep")]["files"] == 1
    assert wait_cached(m, "keep") == {"path": "keep", "size": 2 * MiB, "blocks": 2,
                                      "cached_blocks": 2, "pinned": True}
    # 8 MiB more through a 4 MiB cache: the pinned 2 MiB stay, others are evicted
    for i in range(8):
        (m.mountpoint / "others" / f"o{i}").read_bytes()
    time.sleep(0.5)
    assert cached(m, "keep")["cached_blocks"] == 2
    assert ok_json("status", str(m.mountpoint))["cache"]["evictions"] > 0
    assert sum(cached(m, f"others/o{i}")["cached_blocks"] for i in range(8)) < 8
    listed = ok_json("pin")
    assert [p["path"] for p in listed[str(m.mountpoint)]] == ["keep"]
    # kept fresh: a change on the server is fetched by the refresher
    export.overwrite_as_other_client("keep", b"2" * (2 * MiB))
    time.sleep(1.2)                                       # past the attribute lease
    m.request("refresh_pins")
    assert wait_cached(m, "keep")["cached_blocks"] == 2
    m.reset_rpc_calls()
    assert (m.mountpoint / "keep").read_bytes() == b"2" * (2 * MiB)
    assert m.rpc_calls()["READ"] == 0
    # evict leaves pinned files alone; unpin, then evict
    ev = ok_json("evict", str(m.mountpoint / "keep"))
    assert ev[str(m.mountpoint / "keep")]["pinned_kept"] == ["keep"]
    assert ok_json("unpin", str(m.mountpoint))[str(m.mountpoint)]["files"] == 1
    assert cached(m, "keep")["pinned"] is False
    ok_json("evict", str(m.mountpoint / "keep"))
    assert cached(m, "keep")["cached_blocks"] == 0
    # Pins count against the cache's size: 8 MiB do not fit a 4 MiB cache.
    assert "cache_size 4 MiB" in one_line_error(wancache("pin", str(m.mountpoint / "others")))
    assert ok_json("pin")[str(m.mountpoint)] == []
    human = wancache("pin", str(m.mountpoint / "others" / "o1"))
    assert human.returncode == 0 and human.stdout.startswith(
        f"pinned {m.mountpoint / 'others' / 'o1'}: 1 files")
    assert "No such file or directory" in one_line_error(
        wancache("pin", str(m.mountpoint / "nope")))


def test_evict_drops_a_files_blocks(mount_factory: MountFactory, export: Export) -> None:
    (export.path / "d").mkdir()
    (export.path / "d" / "f").write_bytes(b"e" * 300_000)
    m = mount_factory(["metrics=off"])
    (m.mountpoint / "d" / "f").read_bytes()
    assert wait_cached(m, "d/f")["cached_blocks"] == 1
    proc = wancache("evict", str(m.mountpoint / "d"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"evicted {m.mountpoint / 'd'}: 1 files, 1 blocks")
    assert cached(m, "d/f")["cached_blocks"] == 0
    m.drop_kernel_caches()
    m.reset_rpc_calls()
    assert (m.mountpoint / "d" / "f").read_bytes() == b"e" * 300_000
    assert m.rpc_calls()["READ"] >= 1


def test_commands_fail_in_one_line(mount_factory: MountFactory, export: Export) -> None:
    m = mount_factory(["cache=off", "metrics=off"])
    (m.mountpoint / "f").write_bytes(b"x")
    assert "no block cache" in one_line_error(wancache("pin", str(m.mountpoint / "f")))
    assert "not in a wancache mount" in one_line_error(wancache("evict", "/tmp"))
    assert "not in a wancache mount" in one_line_error(wancache("status", "/tmp"))
    assert "invalid choice" in one_line_error(wancache("frobnicate"))
    assert "required" in one_line_error(wancache("flush"))
    for args in (["status"], ["flush", str(m.mountpoint)], ["pin", str(m.mountpoint)]):
        line = one_line_error(wancache(*args, user=65534))
        assert line == "wancache: permission denied (root only)"


def test_live_mount_files_are_root_only(mount_factory: MountFactory, export: Export,
                                        run_dir: Path, tmp_path: Path) -> None:
    m = mount_factory(["metrics=off"])
    (m.mountpoint / "f").write_bytes(b"journaled")
    sock = control.socket_path(m.mountpoint)
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert sock.stat().st_mode & 0o777 == 0o600
    assert run_dir.stat().st_mode & 0o777 == 0o700
    cache = next(tmp_path.glob("cache-*"))
    assert cache.stat().st_mode & 0o777 == 0o700
    for path in cache.rglob("*"):
        mode = path.stat().st_mode & 0o777
        if path.is_dir():
            assert mode == 0o700, path
        else:
            assert mode & 0o077 == 0, path
    assert any(p.parent.name == "journal" for p in cache.rglob("*") if p.is_file())
