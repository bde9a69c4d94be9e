"""Run a real wancache mount in a child process (for tests, the bench and the demo).

`FuseChild` is any FUSE file system served by a foreground child process (the
bench's pass-through floor, `bench.passthrough`, is one).  `WancacheMount` starts
`wancache mount -f` (so the daemon's log is captured), waits until the FUSE file
system is serving, reads the daemon's own RPC counters through its control socket,
and unmounts with `fusermount3 -u` like a user would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from wancache import control


class MountFailed(RuntimeError):
    """The file system did not come up (or did not go down) as expected."""


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target and line.split()[2].startswith("fuse")
                   for line in f)


class FuseChild:
    """A FUSE file system served by a child process in the foreground; subclasses say
    how to start it (`argv`) and how to tell that it serves (`serving`)."""

    name = "the file system"

    def __init__(self, mountpoint: Path, *, log_path: Path | None = None) -> None:
        self.mountpoint = Path(mountpoint)
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="fuse-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        raise NotImplementedError

    def serving(self) -> bool:
        """True once the file system answers."""
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> Self:
        """Mount and wait until it serves; MountFailed (with the log) otherwise."""
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MountFailed(f"{self.name} exited {self.proc.returncode}: "
                                  f"{self.log()}")
            if self.serving():
                return self
            time.sleep(0.05)
        self.kill()
        raise MountFailed(f"{self.name} did not mount within {timeout}s: {self.log()}")

    def log(self) -> str:
        """Everything the daemon logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def peak_rss(self) -> int:
        """The daemon's peak resident memory in bytes (VmHWM)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def drop_kernel_caches(self) -> None:
        """Make the kernel forget cached dentries, inodes and pages (all file systems)."""
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")

    def unmount(self, timeout: float = 60.0) -> int:
        """`fusermount3 -u` (retrying while busy) and wait for the daemon to exit."""
        if self.proc is None:
            return 0
        deadline = time.monotonic() + timeout
        while is_mounted(self.mountpoint) and time.monotonic() < deadline:
            done = subprocess.run(["fusermount3", "-u", str(self.mountpoint)],
                                  capture_output=True, check=False)
            if done.returncode == 0:
                break
            time.sleep(0.2)
        try:
            rc = self.proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise MountFailed(f"{self.name} did not exit after unmount: {self.log()}") from None
        self.proc = None
        return rc

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the daemon (a crash) and clear the dead mount."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True,
                       check=False)
        self.proc = None


    def __enter__(self) -> Self:
        return self.start() if self.proc is None else self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None:
            try:
                self.unmount()
            except MountFailed:
                if et is None:
                    raise


class WancacheMount(FuseChild):
    """One `wancache mount -f SPEC MOUNTPOINT -o OPTIONS` child process."""

    name = "wancache"

    def __init__(self, spec: str, mountpoint: Path, options: Iterable[str] = (), *,
                 log_path: Path | None = None) -> None:
        super().__init__(mountpoint, log_path=log_path)
        self.spec = spec
        self.options = [o for o in options if o]

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "wancache.cli", "mount", self.spec,
                str(self.mountpoint), "-f"]
        if self.options:
            argv += ["-o", ",".join(self.options)]
        return argv

    def serving(self) -> bool:
        if not is_mounted(self.mountpoint):
            return False
        try:
            control.request(self.mountpoint, "ping", timeout=5)
        except (control.ControlError, OSError):
            return False
        return True

    def request(self, cmd: str, **args: Any) -> Any:
        """A control-socket request to the daemon."""
        return control.request(self.mountpoint, cmd, **args)

    def flush(self, timeout: float = 120.0) -> None:
        """Wait until the daemon's write-back journal is on the server."""
        control.request(self.mountpoint, "flush", timeout=timeout)

    def rpc_calls(self, prefix: str = "nfs3.") -> Counter[str]:
        """The daemon's own count of RPC calls per procedure (without the prefix)."""
        rpc = self.request("stats")["rpc"]
        return Counter({k[len(prefix):]: v for k, v in rpc.items() if k.startswith(prefix)})

    def reset_rpc_calls(self) -> None:
        self.request("reset_stats")
