"""The demo: a local ganesha export behind an emulated WAN, seen through NFS.

`python -m bench.demo` starts a private nfs-ganesha exporting a few sample files,
puts the WAN emulator (branch profile: 50 ms RTT, 100 Mbit/s) in front of it, and
lists and reads the export through the emulator with libnfs-utils.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from bench.nfsserver import NfsServer, NfsServerError, start_server
from bench.wanem import PROFILES, WanEmulatorThread


def _sample_files(export: Path) -> None:
    (export / "README.txt").write_text("Hello from headquarters, across the WAN.\n")
    docs = export / "docs"
    docs.mkdir(exist_ok=True)
    for i in range(5):
        (docs / f"report-{i}.txt").write_text(f"report {i}\n" * 100)


def _url(server: NfsServer, path: str, nfs_port: int, mount_port: int) -> str:
    full = server.export_path.rstrip("/") + ("/" + path if path else "")
    query = urllib.parse.urlencode({"nfsport": nfs_port, "mountport": mount_port,
                                    "version": 3})
    return f"nfs://127.0.0.1{urllib.parse.quote(full)}?{query}"


def _run(argv: list[str]) -> float:
    print(f"$ {' '.join(argv)}")
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"demo: {argv[0]} failed: {proc.stderr.strip()}")
    print(f"  ({elapsed * 1000:.0f} ms)")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="branch")
    args = parser.parse_args(argv)
    for tool in ("nfs-ls", "nfs-cat"):
        if shutil.which(tool) is None:
            print(f"demo: {tool} not found: run scripts/bootstrap (apt-get install "
                  "libnfs-utils)", file=sys.stderr)
            return 1
    profile = PROFILES[args.profile]
    workdir = Path(tempfile.mkdtemp(prefix="wancache-demo-"))
    try:
        server = start_server(workdir=workdir)
    except NfsServerError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    try:
        _sample_files(server.export)
        print(f"nfs-ganesha exports {server.export_path} on 127.0.0.1:{server.nfs_port}")
        with WanEmulatorThread(("127.0.0.1", server.nfs_port), profile) as nfs_wan, \
                WanEmulatorThread(("127.0.0.1", server.mount_port), profile) as mnt_wan:
            print(f"WAN emulator ({profile.describe()}): NFS on 127.0.0.1:{nfs_wan.port}, "
                  f"MOUNT on 127.0.0.1:{mnt_wan.port}\n")
            _run(["nfs-ls", _url(server, "docs", nfs_wan.port, mnt_wan.port)])
            _run(["nfs-cat", _url(server, "README.txt", nfs_wan.port, mnt_wan.port)])
            calls = sum(nfs_wan.counts.values()) + sum(mnt_wan.counts.values())
            print(f"\n{calls} RPCs crossed the emulated WAN.")
    finally:
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
