"""A private nfs-ganesha NFS server on 127.0.0.1, for tests, the bench and the demo.

Each `NfsServer` has its own config, log, pid and recovery directories and its own
free ports, so several can run side by side.  Ganesha registers with rpcbind (the
last one started wins), so clients must be given the explicit NFS and MOUNT ports
this object reports.  Ganesha needs `rpcbind -w` running first, which
`ensure_rpcbind()` takes care of.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

GANESHA = "ganesha.nfsd"
DEBIAN_PACKAGES = "nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils"
PLUGIN_DIRS = ("/usr/lib/x86_64-linux-gnu/ganesha", "/usr/lib/aarch64-linux-gnu/ganesha",
               "/usr/lib64/ganesha", "/usr/lib/ganesha")
NFS_PROGRAM, NFS_VERSION = 100003, 3
MOUNT_PROGRAM, MOUNT_VERSION = 100005, 3


class NfsServerError(RuntimeError):
    """The test NFS server could not be started or is missing."""


def _missing(tool: str) -> NfsServerError:
    return NfsServerError(
        f"{tool} not found: install the Debian packages: apt-get install {DEBIAN_PACKAGES}")


def _plugin_dir() -> str:
    for d in PLUGIN_DIRS:
        if Path(d, "libfsalvfs.so").exists():
            return d
    raise NfsServerError(
        "ganesha's VFS FSAL (libfsalvfs.so) not found: apt-get install nfs-ganesha-vfs")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rpc_null(port: int, program: int, version: int, timeout: float = 2.0) -> bool:
    """Send an ONC-RPC NULL call over TCP; True if the server accepted it."""
    xid = int.from_bytes(os.urandom(4), "big")
    # xid, CALL, rpcvers 2, prog, vers, proc 0, cred AUTH_NONE, verf AUTH_NONE
    msg = struct.pack(">10I", xid, 0, 2, program, version, 0, 0, 0, 0, 0)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(struct.pack(">I", 0x80000000 | len(msg)) + msg)
            head = _recv_exact(s, 4)
            size = struct.unpack(">I", head)[0] & 0x7FFFFFFF
            reply = _recv_exact(s, size)
    except OSError:
        return False
    if len(reply) < 24:
        return False
    rxid, mtype, stat = struct.unpack(">3I", reply[:12])
    accept_stat = struct.unpack(">I", reply[20:24])[0]
    return rxid == xid and mtype == 1 and stat == 0 and accept_stat == 0


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


def rpcbind_running() -> bool:
    """True if a portmapper answers on 127.0.0.1:111."""
    return rpc_null(111, 100000, 2, timeout=1.0)


def ensure_rpcbind() -> None:
    """Start `rpcbind -w` unless a portmapper already answers."""
    if rpcbind_running():
        return
    exe = shutil.which("rpcbind") or ("/sbin/rpcbind" if Path("/sbin/rpcbind").exists() else None)
    if exe is None:
        raise _missing("rpcbind")
    Path("/run/rpcbind").mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-w"], check=False, capture_output=True, timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if rpcbind_running():
            return
        time.sleep(0.1)
    raise NfsServerError("rpcbind -w started but does not answer on 127.0.0.1:111")


CONFIG_TEMPLATE = """\
NFS_CORE_PARAM {{
    Bind_addr = 127.0.0.1;
    NFS_Port = {nfs_port};
    MNT_Port = {mount_port};
    NLM_Port = {nlm_port};
    Rquota_Port = {rquota_port};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Protocols = 3, 4;
    Plugins_Dir = {plugin_dir};
}}
NFS_KRB5 {{ Active_krb5 = false; }}
NFSv4 {{
    Graceless = true;
    RecoveryBackend = fs;
    RecoveryRoot = {recovery};
}}
EXPORT_DEFAULTS {{ Access_Type = RW; Squash = No_Root_Squash; }}
EXPORT {{
    Export_Id = 1;
    Path = {export};
    Pseudo = {export};
    Protocols = 3, 4;
    Transports = TCP;
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = {log_level}; }}
"""


@dataclass
class NfsServer:
    """One nfs-ganesha process exporting `export` read-write, no_root_squash."""

    export: Path
    workdir: Path
    nfs_port: int = 0
    mount_port: int = 0
    log_level: str = "EVENT"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _own_workdir: bool = field(default=False, repr=False)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def export_path(self) -> str:
        """The path a MOUNT client asks for (the real directory: NFSv3 mounts use it)."""
        return str(self.export)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def log_file(self) -> Path:
        return self.workdir / "ganesha.log"

    def url(self, path: str = "", *, export_subdir: str = "") -> str:
        """An `nfs://` URL for libnfs-utils (`nfs-cat`, `nfs-ls`, `nfs-cp`)."""
        base = self.export_path.rstrip("/")
        if export_subdir:
            base += "/" + export_subdir.strip("/")
        full = base + ("/" + path.lstrip("/") if path else "")
        query = urllib.parse.urlencode(
            {"nfsport": self.nfs_port, "mountport": self.mount_port, "version": 3})
        return f"nfs://127.0.0.1{urllib.parse.quote(full)}?{query}"

    def spec(self, subdir: str = "") -> str:
        """`host:/path` as given to `wancache mount`."""
        p = self.export_path.rstrip("/") + ("/" + subdir.strip("/") if subdir else "")
        return f"127.0.0.1:{p}"

    def _write_config(self) -> Path:
        for d in ("recovery", "run"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "ganesha.conf"
        conf.write_text(CONFIG_TEMPLATE.format(
            nfs_port=self.nfs_port, mount_port=self.mount_port, nlm_port=free_port(),
            rquota_port=free_port(), plugin_dir=_plugin_dir(),
            recovery=self.workdir / "recovery", export=self.export,
            log_level=self.log_level))
        return conf

    def start(self, timeout: float = 30.0) -> NfsServer:
        """Start ganesha (on the same ports when restarting) and wait until it answers."""
        exe = shutil.which(GANESHA) or (
            "/usr/bin/ganesha.nfsd" if Path("/usr/bin/ganesha.nfsd").exists() else None)
        if exe is None:
            raise _missing(GANESHA)
        if self.proc is not None and self.proc.poll() is None:
            return self
        ensure_rpcbind()
        self.export.mkdir(parents=True, exist_ok=True)
        fixed_ports = bool(self.nfs_port)
        for _attempt in range(3):
            if not fixed_ports:
                self.nfs_port, self.mount_port = free_port(), free_port()
            conf = self._write_config()
            with self.log_file.open("ab") as log:
                self.proc = subprocess.Popen(
                    [exe, "-F", "-f", str(conf), "-L", str(self.log_file),
                     "-p", str(self.workdir / "run" / "ganesha.pid"), "-N", "NIV_EVENT"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
            if self._wait_ready(timeout):
                return self
            self.stop()
            if fixed_ports:
                break
        tail = self.log_file.read_text(errors="replace").splitlines()[-5:]
        raise NfsServerError(
            f"nfs-ganesha did not answer on 127.0.0.1:{self.nfs_port}; log "
            f"{self.log_file}: {' | '.join(tail)}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            if (rpc_null(self.nfs_port, NFS_PROGRAM, NFS_VERSION, timeout=1.0)
                    and rpc_null(self.mount_port, MOUNT_PROGRAM, MOUNT_VERSION, timeout=1.0)):
                return True
            time.sleep(0.1)
        return False

    def stop(self, timeout: float = 20.0) -> None:
        """Stop ganesha by pid (SIGTERM, then SIGKILL)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        """SIGKILL ganesha: a server crash."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def restart(self) -> None:
        """Stop and start again on the same ports (a server reboot)."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove a work directory this object created."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NfsServer:
        return self.start() if self.proc is None else self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def start_server(export: Path | str | None = None, workdir: Path | str | None = None,
                 **kw: object) -> NfsServer:
    """Create and start a server; with no paths, everything lives in a new temp dir."""
    own = workdir is None
    wd = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="wancache-nfs-"))
    exp = Path(export) if export is not None else wd / "export"
    server = NfsServer(export=exp.resolve(), workdir=wd.resolve(), _own_workdir=own,
                       **kw)  # type: ignore[arg-type]
    try:
        return server.start()
    except BaseException:
        with contextlib.suppress(Exception):
            server.close()
        raise
