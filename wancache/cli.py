"""The `wancache` command: mount, and drive a running mount over its control socket.

    wancache mount HOST:/EXPORT DIR [-o OPTIONS] [-f]   mount (a daemon unless -f)
    wancache options [--markdown]                        the mount options
    wancache status [MOUNT]                              state of one or every mount
    wancache flush MOUNT                                 wait until writes are on the server
    wancache prefetch PATH...                            warm metadata and data of trees
    wancache pin [PATH...] / unpin PATH... / evict PATH...

Errors a user can cause (bad options, unusable mount point, unreachable server,
missing export, a path outside any mount) end with one line on stderr and a
non-zero exit, never a traceback.  `--json` prints machine-readable results.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import trio

from wancache import config, control
from wancache.config import Config, ConfigError
from wancache.control import ControlError
from wancache.logsetup import become_daemon_logger, setup_logging
from wancache.nfs_backend.errors import WancacheError

log = logging.getLogger("wancache")

READY_FD_ENV = "WANCACHE_READY_FD"
EXIT_USAGE, EXIT_FAIL = 2, 1
REQUEST_TIMEOUT = 60.0     # seconds of silence from a daemon before giving up
PREFETCH_JOBS = 16         # files read (directories listed) at once by `prefetch`
READ_CHUNK = 1 << 20

__all__ = ["main", "run_daemon", "setup_logging"]


class CliError(Exception):
    """A one-line failure for the user."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


# -- mounting ---------------------------------------------------------------------------


def _report_ready(message: str) -> None:
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    try:
        os.write(int(fd), message.encode() + b"\n")
        os.close(int(fd))
    except OSError:
        pass


def _fail(message: str, code: int = EXIT_FAIL, prog: str = "wancache") -> int:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"{prog}: {first}", file=sys.stderr)
    _report_ready(f"error: {first}")
    return code


def run_foreground(cfg: Config, ready: Callable[[], None] | None = None) -> int:
    """Serve the mount in this process until it is unmounted."""
    from wancache import mount  # pyfuse3 is only needed to really mount

    try:
        trio.run(mount.serve, cfg, ready or (lambda: _report_ready("ready")))
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (WancacheError, OSError) as exc:
        return _fail(str(exc))
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        if isinstance(leaf, ConfigError):
            return _fail(str(leaf), EXIT_USAGE)
        if isinstance(leaf, WancacheError | OSError):
            return _fail(str(leaf))
        raise
    except KeyboardInterrupt:
        return 0
    return 0


def run_daemon(argv: list[str], prog: str = "wancache") -> int:
    """Start `wancache <argv> --foreground` as a background daemon; return once it
    serves (0), or its exit status after printing its one-line reason."""
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, **{READY_FD_ENV: str(write_fd)})
    with tempfile.TemporaryFile() as err_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "wancache.cli", *argv, "--foreground"],
            env=env, pass_fds=(write_fd,), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err_file, start_new_session=True)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode(errors="replace").strip()
        if message == "ready":
            return 0
        child.wait()
        err_file.seek(0)
        err = err_file.read().decode(errors="replace")
    if message.startswith("error: "):
        print(f"{prog}: {message[7:]}", file=sys.stderr)
    else:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        print(f"{prog}: the mount daemon exited ({child.returncode})"
              + (f": {lines[-1]}" if lines else ""), file=sys.stderr)
    return child.returncode or EXIT_FAIL


def daemon_argv(spec: str, mountpoint: str, options: list[str]) -> list[str]:
    """`wancache` arguments that mount `spec` on `mountpoint` (absolute) as a daemon."""
    argv = ["mount", spec, os.path.abspath(mountpoint)]
    if options:
        argv += ["-o", ",".join(options)]
    return argv


def cmd_mount(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        cfg = config.build_config(args.spec, args.mountpoint, args.options or [])
        if args.debug:
            cfg = config.parse_options("debug", cfg)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    if not args.foreground:
        from wancache.mount import MountPointError, check_mountpoint
        try:
            check_mountpoint(cfg.mountpoint)
        except MountPointError as exc:
            return _fail(str(exc), EXIT_USAGE)
        return run_daemon(argv)
    setup_logging(cfg, foreground=True)
    if READY_FD_ENV not in os.environ:
        return run_foreground(cfg)
    # A daemon child: log to stderr (the parent shows it if we fail) until serving,
    # and keep no directory busy.
    cfg.mountpoint = Path(os.path.abspath(cfg.mountpoint))
    if cfg.cache_dir is not None:
        cfg.cache_dir = Path(os.path.abspath(cfg.cache_dir))
    os.chdir("/")
    log_name = control.socket_path(cfg.mountpoint).stem   # before mounting

    def ready() -> None:
        become_daemon_logger(cfg, log_name)
        _report_ready("ready")

    return run_foreground(cfg, ready)


def cmd_options(args: argparse.Namespace, argv: list[str]) -> int:
    if args.markdown:
        print(config.options_table())
    else:
        for o in config.OPTIONS:
            print(f"{o.name:22} {o.help}")
    return 0


# -- talking to daemons ---------------------------------------------------------------


def _need_root() -> None:
    if os.geteuid() != 0:
        raise CliError("permission denied (root only)")


def _mount_of(path: str) -> tuple[Path, str]:
    """(mount point, path relative to it) of `path` inside a wancache mount."""
    mounts = control.mounts()
    candidates = [os.path.abspath(path)]
    real = os.path.realpath(path)
    if real != candidates[0]:
        candidates.append(real)
    for cand in candidates:
        best: Path | None = None
        for m in mounts:
            ms = str(m)
            if (cand == ms or cand.startswith(ms.rstrip("/") + "/")) and \
                    (best is None or len(ms) > len(str(best))):
                best = m
        if best is not None:
            rel = os.path.relpath(cand, best)
            return best, "" if rel == "." else rel
    raise CliError(f"{path} is not in a wancache mount")


def _request(mountpoint: Path, cmd: str, show: Callable[[dict[str, Any]], None] | None = None,
             timeout: float = REQUEST_TIMEOUT, deadline: float | None = None,
             **args: Any) -> Any:
    """A control request; progress dicts go to `show`.  CliError on failure."""
    try:
        it = control.request_iter(mountpoint, cmd, timeout=timeout, **args)
        while True:
            try:
                info = next(it)
            except StopIteration as stop:
                return stop.value
            if show is not None:
                show(info)
            if deadline is not None and time.monotonic() > deadline:
                it.close()
                raise CliError(f"{cmd} did not finish in time ({_describe_progress(info)})")
    except ControlError as exc:
        raise CliError(str(exc)) from None
    except TimeoutError:
        raise CliError(f"the daemon of {mountpoint} did not answer within {timeout:g}s") \
            from None
    except OSError as exc:
        raise CliError(f"cannot talk to the daemon of {mountpoint}: {exc}") from None


def _describe_progress(info: dict[str, Any]) -> str:
    if "pending" in info:
        return f"{info['pending']} changes still pending"
    return ", ".join(f"{k} {v}" for k, v in info.items())


class ProgressLine:
    """A progress bar redrawn in place on stderr (only on a terminal)."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.width = 0
        self.last = 0.0

    def show(self, text: str, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < 0.1:
            return
        self.last = now
        pad = max(0, self.width - len(text))
        self.width = len(text)
        sys.stderr.write("\r" + text + " " * pad)
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0


def bar(done: float, total: float, width: int = 24) -> str:
    """'[#########...............]  37%'"""
    frac = min(1.0, done / total) if total > 0 else 1.0
    filled = int(frac * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {frac * 100:3.0f}%"


def size(n: float) -> str:
    """Bytes, human-readable (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


# -- status -----------------------------------------------------------------------------


def status_text(st: dict[str, Any]) -> str:
    """The human form of one mount's status."""
    if st.get("state") == "down":
        return f"{st['mountpoint']}  down: {st.get('error', 'the daemon does not answer')}"
    lease = st["leases"]
    cache, wb, hit, rpc = st["cache"], st["writeback"], st["hit_ratio"], st["rpc"]
    files, dirs = lease["files"], lease["directories"]
    lines = [
        f"{st['mountpoint']}  {st['server']}  {st['state']}  (pid {st['pid']})",
        f"  leases      files {files[0]:g}-{files[1]:g}s, directories {dirs[0]:g}-"
        f"{dirs[1]:g}s, missing names {lease['negative']:g}s, "
        f"consistency={lease['consistency']}",
    ]
    if cache["size_bytes"]:
        lines.append(f"  cache       {size(cache['used_bytes'])} of "
                     f"{size(cache['size_bytes'])} used, {cache['blocks']} blocks, "
                     f"{cache['pinned_files']} pinned files, {cache['evictions']} evictions")
    else:
        lines.append("  cache       off (pass-through)")
    if wb["enabled"]:
        lines.append(f"  write-back  {size(wb['dirty_bytes'])} dirty, {wb['pending_ops']} "
                     f"changes pending (oldest {wb['oldest_seconds']:g}s), "
                     f"{wb['conflicts']} conflicts, {wb['lost']} lost")
        if "journal" in st:
            j = st["journal"]
            lines.append(f"  journal     {size(j['bytes_on_disk'])} on disk of "
                         f"{size(j['max_bytes'])}, {j['segments']} segments, "
                         f"{j['records_pending']} records pending")
    else:
        lines.append("  write-back  off (writes go straight to the server)")
    lines.append(f"  hit ratios  attributes {_pct(hit['attr'])}, directories "
                 f"{_pct(hit['dir'])}, blocks {_pct(hit['block'])}, "
                 f"bytes read from cache {_pct(hit['read_bytes'])}")
    lines.append(f"  rpc         {rpc['calls']} calls, {rpc['errors']} errors, "
                 f"{rpc['in_flight']} in flight, {rpc['reconnects']} reconnects")
    if "process" in st:        # (a daemon of an older version does not say)
        p, t = st["process"], st["tables"]
        lines.append(f"  daemon      {size(p['rss_bytes'])} resident (peak "
                     f"{size(p['peak_rss_bytes'])}), {p['open_fds']} fds, "
                     f"{p['trio_tasks']} tasks, {t['inodes']} inodes, {t['nodes']} nodes, "
                     f"{t['open_files']} open files")
    lines.append("  metrics     " + (f"http://{st['metrics']}/metrics" if st["metrics"]
                                     else "off"))
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace, argv: list[str]) -> int:
    _need_root()
    if args.mount:
        mnt, _ = _mount_of(args.mount)
        st = _request(mnt, "status", timeout=args.timeout)
        _print_json(st) if args.json else print(status_text(st))
        return 0
    found = []
    for mnt in control.mounts():
        try:
            found.append(_request(mnt, "status", timeout=args.timeout))
        except CliError as exc:
            found.append({"mountpoint": str(mnt), "state": "down", "error": str(exc)})
    if args.json:
        _print_json(found)
    elif not found:
        print("no wancache mounts")
    else:
        print("\n\n".join(status_text(st) for st in found))
    return 1 if any(st["state"] == "down" for st in found) else 0


# -- flush ------------------------------------------------------------------------------


def cmd_flush(args: argparse.Namespace, argv: list[str]) -> int:
    _need_root()
    mnt, _ = _mount_of(args.mount)
    line = ProgressLine(False if args.json else None)
    began = time.monotonic()

    def show(p: dict[str, Any]) -> None:
        total = max(p.get("total", 0), p["pending"])
        down = "" if p.get("server_up", True) else "  (server unreachable: waiting)"
        line.show(f"flushing {mnt} {bar(total - p['pending'], total)}  {p['pending']} "
                  f"changes, {size(p['dirty_bytes'])} to go{down}")

    deadline = began + args.timeout if args.timeout else None
    try:
        result = _request(mnt, "flush", show, deadline=deadline)
    finally:
        line.clear()
    if args.json:
        _print_json(result)
    elif result["flushed"]:
        print(f"flushed {result['flushed']} changes to the server in "
              f"{result['seconds']:.1f}s")
    else:
        print(f"nothing to flush: {mnt} is in sync with the server")
    return 0


# -- prefetch ---------------------------------------------------------------------------


def _wancache_mounts() -> list[str]:
    """Mount points of wancache file systems (from /proc/self/mounts)."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    return [p[1].replace("\\040", " ") for p in (ln.split() for ln in lines)
            if len(p) >= 3 and p[2] == "fuse.wancache"]


def _scan(path: str, dev: int) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """(subdirectories, regular files with sizes, errors) of one directory."""
    dirs: list[str] = []
    files: list[tuple[str, int]] = []
    errors: list[str] = []
    try:
        with os.scandir(path) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    errors.append(f"{entry.path}: {exc.strerror}")
                    continue
                if stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
                    dirs.append(entry.path)
                elif stat.S_ISREG(st.st_mode):
                    files.append((entry.path, st.st_size))
    except OSError as exc:
        errors.append(f"{path}: {exc.strerror}")
    return dirs, files, errors


def _read_all(path: str) -> int:
    """Read a file to its end through the mount (into the block cache)."""
    n = 0
    buf = bytearray(READ_CHUNK)
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            n += k
    return n


def prefetch(paths: list[str], *, metadata_only: bool = False, jobs: int = PREFETCH_JOBS,
             show: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Walk `paths` through the mount: list every directory, stat every entry and
    (unless `metadata_only`) read every regular file.  Returns the counts."""
    began = time.monotonic()
    totals: dict[str, Any] = {"directories": 0, "files": 0, "bytes": 0, "errors": 0}
    errors: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        pending: dict[concurrent.futures.Future[Any], str] = {}

        def add_files(files: list[tuple[str, int]]) -> None:
            for fpath, _size in files:
                if metadata_only:
                    totals["files"] += 1
                else:
                    pending[pool.submit(_read_all, fpath)] = "file:" + fpath

        for p in paths:
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                pending[pool.submit(_scan, p, st.st_dev)] = "dir:" + str(st.st_dev)
            elif stat.S_ISREG(st.st_mode):
                add_files([(p, st.st_size)])
        while pending:
            done, _ = concurrent.futures.wait(pending, timeout=0.2,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                kind = pending.pop(fut)
                if kind.startswith("dir:"):
                    dirs, files, errs = fut.result()
                    totals["directories"] += 1
                    errors.extend(errs)
                    for d in dirs:
                        pending[pool.submit(_scan, d, int(kind[4:]))] = kind
                    add_files(files)
                else:
                    try:
                        totals["bytes"] += fut.result()
                        totals["files"] += 1
                    except OSError as exc:
                        errors.append(f"{kind[5:]}: {exc.strerror}")
            if show is not None:
                show({**totals, "queued": len(pending), "errors": len(errors)})
    totals["errors"] = len(errors)
    totals["first_error"] = errors[0] if errors else None
    totals["seconds"] = round(time.monotonic() - began, 3)
    return totals


def cmd_prefetch(args: argparse.Namespace, argv: list[str]) -> int:
    mounts = _wancache_mounts()
    for p in args.paths:
        ap = os.path.abspath(p)
        if not any(ap == m or ap.startswith(m.rstrip("/") + "/") for m in mounts):
            raise CliError(f"{p} is not in a wancache mount")
        try:
            os.lstat(p)
        except OSError as exc:
            raise CliError(f"{p}: {exc.strerror}") from None
    line = ProgressLine(False if args.json else None)

    def show(t: dict[str, Any]) -> None:
        line.show(f"prefetching: {t['directories']} directories, {t['files']} files, "
                  f"{size(t['bytes'])}, {t['queued']} queued"
                  + (f", {t['errors']} errors" if t["errors"] else ""))

    try:
        totals = prefetch(args.paths, metadata_only=args.metadata_only, jobs=args.jobs,
                          show=show)
    finally:
        line.clear()
    if args.json:
        _print_json(totals)
    else:
        secs = totals["seconds"]
        rate = f", {size(totals['bytes'] / secs)}/s" if secs > 0 and totals["bytes"] else ""
        what = "metadata of " if args.metadata_only else ""
        print(f"prefetched {what}{totals['directories']} directories, {totals['files']} "
              f"files, {size(totals['bytes'])} in {secs:.1f}s{rate}")
    if totals["errors"]:
        print(f"wancache: {totals['errors']} entries could not be read (first: "
              f"{totals['first_error']})", file=sys.stderr)
        return EXIT_FAIL
    return 0


# -- pin, unpin, evict ------------------------------------------------------------------


def _path_command(cmd: str, args: argparse.Namespace,
                  describe: Callable[[str, Any], str]) -> int:
    """Send `cmd` for each of `args.paths`; print `describe(path, result)` or JSON."""
    line = ProgressLine(False if args.json else None)
    results = {}
    for p in args.paths:
        mnt, rel = _mount_of(p)

        def show(info: dict[str, Any], p: str = p) -> None:
            if "of" in info:
                line.show(f"{cmd} {p} {bar(info['files'], info['of'])} "
                          f"{info['files']}/{info['of']} files, {size(info['bytes'])}")

        try:
            result = _request(mnt, cmd, show, path=rel)
        except CliError as exc:
            msg = str(exc)
            if rel and msg.startswith(rel + ":"):
                msg = p + msg[len(rel):]
            raise CliError(msg) from None
        finally:
            line.clear()
        results[p] = result
        if not args.json:
            print(describe(p, result))
    if args.json:
        _print_json(results)
    return 0


def cmd_pin(args: argparse.Namespace, argv: list[str]) -> int:
    _need_root()
    if not args.paths:
        listing = {}
        for mnt in control.mounts():
            try:
                listing[str(mnt)] = _request(mnt, "pins")
            except CliError:
                continue
        if args.json:
            _print_json(listing)
            return 0
        for mnt_s, pins in listing.items():
            for pin in pins:
                cached = (f"{size(pin['size'])}, {bar(pin['cached_blocks'], pin['blocks'])} "
                          "cached") if "blocks" in pin else "(not resolvable now)"
                print(f"{os.path.join(mnt_s, pin['path'])}  {cached}")
        return 0

    def pinned(p: str, r: Any) -> str:
        skipped = f"; {len(r['skipped'])} files not yet on the server skipped" \
            if r["skipped"] else ""
        return (f"pinned {p}: {r['files']} files, {size(r['bytes'])} (fetched "
                f"{size(r['fetched_bytes'])} in {r['seconds']:.1f}s){skipped}")

    return _path_command("pin", args, pinned)


def cmd_unpin(args: argparse.Namespace, argv: list[str]) -> int:
    _need_root()
    return _path_command("unpin", args, lambda p, r: f"unpinned {p}: {r['files']} files")


def cmd_evict(args: argparse.Namespace, argv: list[str]) -> int:
    _need_root()

    def evicted(p: str, r: Any) -> str:
        kept = f"; {len(r['pinned_kept'])} pinned files kept (unpin them first)" \
            if r["pinned_kept"] else ""
        return f"evicted {p}: {r['files']} files, {r['blocks']} blocks{kept}"

    return _path_command("evict", args, evicted)


# -- the parser -------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors."""

    def error(self, message: str) -> NoReturn:
        print(f"wancache: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wancache",
                     description="A FUSE cache for NFSv3 exports across a WAN.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    m = sub.add_parser("mount", help="mount HOST:/EXPORT on a directory")
    m.add_argument("spec", metavar="HOST:/EXPORT")
    m.add_argument("mountpoint", type=Path)
    m.add_argument("-o", dest="options", action="append", metavar="OPTIONS",
                   help="comma-separated mount options (see `wancache options`)")
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground, log to stderr")
    m.add_argument("-d", "--debug", action="store_true", help="log every RPC")
    m.set_defaults(func=cmd_mount)
    o = sub.add_parser("options", help="list the mount options")
    o.add_argument("--markdown", action="store_true", help="as the README's table")
    o.set_defaults(func=cmd_options)

    def with_json(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    s = with_json(sub.add_parser("status", help="state of a mount (all mounts if omitted)"))
    s.add_argument("mount", nargs="?", metavar="MOUNT")
    s.add_argument("--timeout", type=float, default=10.0, help="seconds to wait per mount")
    s.set_defaults(func=cmd_status)
    f = with_json(sub.add_parser("flush", help="wait until every change is on the server"))
    f.add_argument("mount", metavar="MOUNT")
    f.add_argument("--timeout", type=float, default=0.0,
                   help="give up after this many seconds (default: wait)")
    f.set_defaults(func=cmd_flush)
    pf = with_json(sub.add_parser("prefetch", help="warm metadata and data of trees"))
    pf.add_argument("paths", nargs="+", metavar="PATH")
    pf.add_argument("--metadata-only", action="store_true",
                    help="list directories and stat entries, read no file data")
    pf.add_argument("-j", "--jobs", type=int, default=PREFETCH_JOBS,
                    help="files and directories read at once")
    pf.set_defaults(func=cmd_prefetch)
    pn = with_json(sub.add_parser("pin", help="keep files cached and fresh (list if no "
                                              "PATH)"))
    pn.add_argument("paths", nargs="*", metavar="PATH")
    pn.set_defaults(func=cmd_pin)
    up = with_json(sub.add_parser("unpin", help="let pinned files be evicted again"))
    up.add_argument("paths", nargs="+", metavar="PATH")
    up.set_defaults(func=cmd_unpin)
    ev = with_json(sub.add_parser("evict", help="drop files' blocks from the cache"))
    ev.add_argument("paths", nargs="+", metavar="PATH")
    ev.set_defaults(func=cmd_evict)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `wancache`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args, argv))
    except CliError as exc:
        print(f"wancache: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("wancache: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
