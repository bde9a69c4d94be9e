"""The `wancache` command: mount, and (later) drive a running mount.

Errors a user can cause (bad options, unusable mount point, unreachable server,
missing export) end with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import subprocess
import sys
from pathlib import Path

import trio

from wancache import config
from wancache.config import Config, ConfigError
from wancache.nfs_backend.errors import WancacheError

log = logging.getLogger("wancache")

READY_FD_ENV = "WANCACHE_READY_FD"
EXIT_USAGE, EXIT_FAIL = 2, 1


def setup_logging(cfg: Config, *, foreground: bool) -> None:
    """stderr in the foreground; syslog (the journal) for a daemon."""
    level = getattr(logging, cfg.log_level.upper())
    handler: logging.Handler
    if foreground or not Path("/dev/log").exists():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter(
            f"wancache[{os.getpid()}] {cfg.mountpoint}: %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(level)


def _report_ready(message: str) -> None:
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    try:
        os.write(int(fd), message.encode() + b"\n")
        os.close(int(fd))
    except OSError:
        pass


def _fail(message: str, code: int = EXIT_FAIL) -> int:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"wancache: {first}", file=sys.stderr)
    _report_ready(f"error: {first}")
    return code


def run_foreground(cfg: Config) -> int:
    """Serve the mount in this process until it is unmounted."""
    from wancache import mount  # pyfuse3 is only needed to really mount

    try:
        trio.run(mount.serve, cfg, lambda: _report_ready("ready"))
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


def run_daemon(argv: list[str]) -> int:
    """Start the mount in a background process; return once it serves (or failed)."""
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, **{READY_FD_ENV: str(write_fd)})
    child = subprocess.Popen(
        [sys.executable, "-m", "wancache.cli", *argv, "--foreground"],
        env=env, pass_fds=(write_fd,), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    if message == "ready":
        if child.stderr is not None:
            child.stderr.close()
        return 0
    child.wait()
    err = child.stderr.read().decode(errors="replace") if child.stderr else ""
    if message.startswith("error: "):
        print(f"wancache: {message[7:]}", file=sys.stderr)
    else:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        print(f"wancache: the mount daemon exited ({child.returncode})"
              + (f": {lines[-1]}" if lines else ""), file=sys.stderr)
    return child.returncode or EXIT_FAIL


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
    return run_foreground(cfg)


def cmd_options(args: argparse.Namespace, argv: list[str]) -> int:
    if args.markdown:
        print(config.options_table())
    else:
        for o in config.OPTIONS:
            print(f"{o.name:22} {o.help}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wancache", description="A FUSE cache for NFSv3 exports across a WAN.")
    sub = parser.add_subparsers(dest="command", required=True)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `wancache`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return int(args.func(args, argv))


if __name__ == "__main__":
    sys.exit(main())
