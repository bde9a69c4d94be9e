"""Where a mount logs: stderr in the foreground, the journal (syslog) as a daemon.

A daemon started by `wancache mount` or `mount.wancache` logs to stderr until it
serves (its parent shows the last line if it fails), then switches to syslog at
`/dev/log` (the journal on systemd machines).  Without a syslog socket it appends
to `/var/log/wancache/<mount>.log` (root only) instead.  `log_level=` sets the
level of wancache's loggers; `-o debug` adds one line per RPC.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import logging.handlers
import os
import sys
from pathlib import Path

from wancache.config import Config

log = logging.getLogger("wancache")

SYSLOG_ENV = "WANCACHE_SYSLOG"      # syslog socket (default /dev/log)
LOG_DIR_ENV = "WANCACHE_LOG_DIR"    # fallback log directory (default /var/log/wancache)


def syslog_socket() -> Path:
    return Path(os.environ.get(SYSLOG_ENV, "/dev/log"))


def log_dir() -> Path:
    return Path(os.environ.get(LOG_DIR_ENV, "/var/log/wancache"))


class DroppedReplies(logging.Filter):
    """pyfuse3 logs an ERROR when a reply to the kernel fails.  ENOENT means the
    kernel had dropped the request (the connection ended at an unmount, or its
    caller was killed): nothing to act on, so it is logged as INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "fuse_reply_* failed" in str(record.msg) and \
                record.args == (os.strerror(errno.ENOENT),):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = record.msg.replace("fuse_reply_* failed with %s",
                                            "the kernel had dropped the request (%s)")
        return True


def _install(handler: logging.Handler, cfg: Config) -> None:
    logging.getLogger("pyfuse3").filters[:] = [DroppedReplies()]
    root = logging.getLogger()
    for old in root.handlers:
        with contextlib.suppress(Exception):
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(getattr(logging, cfg.log_level.upper()))


def setup_logging(cfg: Config, *, foreground: bool, log_name: str = "") -> None:
    """stderr in the foreground; else syslog, or the log file `log_name` under
    `log_dir()` when there is no syslog socket."""
    if foreground:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler = daemon_handler(cfg, log_name)
    _install(handler, cfg)


def daemon_handler(cfg: Config, log_name: str) -> logging.Handler:
    """A syslog handler if the syslog socket is there, else a root-only log file."""
    sock = syslog_socket()
    if sock.is_socket():
        try:
            handler: logging.Handler = logging.handlers.SysLogHandler(
                address=str(sock), facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            handler.setFormatter(logging.Formatter(
                f"wancache[{os.getpid()}]: {cfg.mountpoint}: %(levelname)s %(message)s"))
            return handler
        except OSError:
            pass
    directory = log_dir()
    path = directory / f"{log_name or 'wancache'}.log"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.close(fd)
        handler = logging.handlers.WatchedFileHandler(path)
    except OSError:
        return logging.NullHandler()
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s wancache[{os.getpid()}] %(levelname)s %(name)s: %(message)s"))
    return handler


def become_daemon_logger(cfg: Config, log_name: str) -> None:
    """Switch a daemon that now serves from stderr (its parent stops reading it) to
    syslog or its log file, and point stdin/stdout/stderr at /dev/null."""
    _install(daemon_handler(cfg, log_name), cfg)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            os.dup2(devnull, fd)
    os.close(devnull)
    log.info("serving %s at %s (pid %d)", cfg.spec, cfg.mountpoint, os.getpid())
