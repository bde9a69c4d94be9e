"""The demo: a local ganesha export behind an emulated WAN, mounted through wancache.

`python -m bench.demo` starts a private nfs-ganesha exporting a few sample files,
puts the WAN emulator (branch profile: 50 ms RTT, 100 Mbit/s) in front of it,
mounts it with wancache and shows `ls -l` and `cat` working, with the round trips
each one cost, then unmounts and stops everything.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.nfsserver import NfsServerError, start_server
from bench.wanem import PROFILES, WanEmulatorThread
from bench.wcmount import MountFailed, WancacheMount


def _sample_files(export: Path) -> None:
    (export / "README.txt").write_text("Hello from headquarters, across the WAN.\n")
    docs = export / "docs"
    docs.mkdir(exist_ok=True)
    for i in range(5):
        (docs / f"report-{i}.txt").write_text(f"report {i}\n" * 100)


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
                  f"MOUNT on 127.0.0.1:{mnt_wan.port}")
            mountpoint = workdir / "mnt"
            options = [f"nfsport={nfs_wan.port}", f"mountport={mnt_wan.port}",
                       f"cache_dir={workdir / 'cache'}", "metrics=off"]
            print(f"$ wancache mount {server.spec()} {mountpoint} -o {','.join(options)}\n")
            with WancacheMount(server.spec(), mountpoint, options,
                               log_path=workdir / "wancache.log") as mnt:
                for command in (["ls", "-l", str(mountpoint / "docs")],
                                ["cat", str(mountpoint / "README.txt")],
                                ["ls", "-l", str(mountpoint / "docs")]):
                    mnt.reset_rpc_calls()
                    _run(command)
                    calls = mnt.rpc_calls()
                    per_proc = ", ".join(f"{k} {v}" for k, v in sorted(calls.items()))
                    n = sum(calls.values())
                    print(f"  {n} round trip{'' if n == 1 else 's'} to the server"
                          + (f" ({per_proc})" if per_proc else ": answered from the cache")
                          + "\n")
            print("unmounted.")
    except MountFailed as exc:
        print(f"demo: wancache did not mount: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    finally:
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
