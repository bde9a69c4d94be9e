"""Mount options, parsed into one typed `Config`.

Every option, its type, default and meaning is declared once, in `OPTIONS`; the
README's options table is generated from it (`wancache options --markdown`), so the
documentation cannot drift from the parser.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad mount option or mount specification (one line, for the user)."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_TIME = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_TIME_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(text: str) -> int:
    """'64k', '50G', '1MiB', '4096' -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 4096, 64K, 50G)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(text: str) -> float:
    """'30', '30s', '500ms', '2m' -> seconds."""
    m = _TIME.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30, 30s, 500ms, 2m)")
    unit = m.group(2).lower() if m.group(2) else None
    return float(m.group(1)) * _TIME_UNITS[unit]


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "yes", "on", "true", ""):
        return True
    if low in ("0", "no", "off", "false"):
        return False
    raise ValueError(f"not on/off: {text!r}")


def _choice(*values: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in values:
            raise ValueError(f"must be one of {', '.join(values)}")
        return text
    parse.__name__ = "|".join(values)
    return parse


def _port(text: str) -> int:
    n = int(text)
    if not 0 < n < 65536:
        raise ValueError("not a TCP port")
    return n


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise ValueError("must be >= 1")
    return n


def _metrics_addr(text: str) -> str:
    if text in ("off", "none", ""):
        return ""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("use HOST:PORT or off")
    _port(port)
    return text


@dataclass(frozen=True)
class Option:
    """One mount option: its `Config` field, parser and documentation."""

    name: str
    attr: str
    parse: Callable[[str], Any]
    help: str
    flag_value: Any = None   # value when given as a bare flag ("soft"); None: needs "=value"


# Generic mount(8)/fstab options that are not ours: accepted and ignored.
IGNORED_OPTIONS = frozenset({
    "defaults", "rw", "auto", "noauto", "user", "nouser", "users", "exec", "noexec",
    "suid", "nosuid", "dev", "nodev", "async", "sync", "atime", "noatime", "relatime",
    "norelatime", "strictatime", "nodiratime", "diratime", "_netdev", "nofail", "owner",
    "group", "comment", "loud", "silent", "nolock", "lock", "tcp", "vers", "nfsvers",
    "proto", "noacl", "nocto", "fg", "bg", "intr", "nointr", "lazytime", "nolazytime",
    "iversion", "noiversion", "mand", "nomand",
    # SELinux labels, symlink policy, helper selection: set by mount(8) or fstab
    "context", "fscontext", "defcontext", "rootcontext", "nosymfollow", "symfollow",
    "helper",
})
IGNORED_PREFIXES = ("x-", "comment=", "x-systemd.", "x-gvfs")


@dataclass
class Config:
    """Everything a mount needs, with documented defaults (see OPTIONS)."""

    host: str = ""
    export: str = ""
    mountpoint: Path = Path()
    # server
    nfs_port: int | None = None
    mount_port: int | None = None
    rsize: int | None = None
    wsize: int | None = None
    nconnect: int = 1
    resvport: bool = False
    # failure handling
    hard: bool = False
    timeout: float = 30.0
    timeo: float = 5.0
    # caching
    cache: bool = True
    consistency: str = "lease"
    acregmin: float = 3.0
    acregmax: float = 60.0
    acdirmin: float = 30.0
    acdirmax: float = 60.0
    lease_min: float = 0.0
    lease_max: float = 3600.0
    neg_lease: float = 5.0
    attr_entries: int = 100_000
    dir_entries: int = 1_000_000
    prefetch_depth: int = 2
    prefetch_concurrency: int = 8
    cache_dir: Path | None = None
    cache_size: int = 10 << 30
    block_size: int = 1 << 20
    readahead: int = 32 << 20
    small_file: int = 256 << 10
    dir_readahead: int = 8 << 20
    # writing
    writeback: bool = True
    writeback_delay: float = 1.0
    max_dirty: int = 256 << 20
    dirty_wait: float = 60.0
    # operating
    read_only: bool = False
    allow_other: bool = True
    fsname: str = ""
    metrics: str = "127.0.0.1:9477"
    log_level: str = "info"
    debug: bool = False
    ignored: list[str] = field(default_factory=list)

    @property
    def spec(self) -> str:
        return f"{self.host}:{self.export}"

    def lease_bounds(self, is_dir: bool) -> tuple[float, float]:
        """(min, max) attribute lease for files or directories, within lease_min..lease_max."""
        lo, hi = (self.acdirmin, self.acdirmax) if is_dir else (self.acregmin, self.acregmax)
        lo = min(max(lo, self.lease_min), self.lease_max)
        hi = min(max(hi, lo), self.lease_max)
        return lo, hi


def _set_actimeo(cfg: Config, value: float) -> None:
    cfg.acregmin = cfg.acregmax = cfg.acdirmin = cfg.acdirmax = value


OPTIONS: tuple[Option, ...] = (
    Option("nfsport", "nfs_port", _port, "NFS port; default: ask the server's rpcbind"),
    Option("mountport", "mount_port", _port, "MOUNT v3 port; default: ask rpcbind"),
    Option("rsize", "rsize", parse_size, "cap on READ size; default: server's FSINFO rtpref"),
    Option("wsize", "wsize", parse_size, "cap on WRITE size; default: server's FSINFO wtpref"),
    Option("nconnect", "nconnect", _positive_int, "TCP connections to the server"),
    Option("resvport", "resvport", parse_bool, "connect from a reserved port (< 1024)", True),
    Option("noresvport", "resvport", lambda _v: False, "connect from any port (default)",
           False),
    Option("hard", "hard", parse_bool,
           "retry calls until the server answers (a dead server blocks callers)", True),
    Option("soft", "hard", lambda _v: False,
           "fail calls with ETIMEDOUT after `timeout` (default)", False),
    Option("timeout", "timeout", parse_duration, "soft mounts: seconds before a call fails"),
    Option("timeo", "timeo", parse_duration,
           "seconds of silence before the connection is probed, then re-established"),
    Option("cache", "cache", parse_bool,
           "off = pure pass-through: every operation goes to the server"),
    Option("consistency", "consistency", _choice("lease", "cto"),
           "lease: trust caches within their lease; cto: also revalidate on open, flush "
           "on close"),
    Option("actimeo", "", parse_duration, "set acregmin, acregmax, acdirmin, acdirmax at once"),
    Option("acregmin", "acregmin", parse_duration, "shortest attribute lease of a file"),
    Option("acregmax", "acregmax", parse_duration, "longest attribute lease of a file"),
    Option("acdirmin", "acdirmin", parse_duration, "shortest lease of a directory"),
    Option("acdirmax", "acdirmax", parse_duration, "longest lease of a directory"),
    Option("lease_min", "lease_min", parse_duration, "lower bound on every lease"),
    Option("lease_max", "lease_max", parse_duration, "upper bound on every lease"),
    Option("neg_lease", "neg_lease", parse_duration, "lease of a remembered ENOENT"),
    Option("attr_entries", "attr_entries", _positive_int, "attribute cache entries (LRU)"),
    Option("dir_entries", "dir_entries", _positive_int,
           "names kept in cached directory listings (LRU by directory)"),
    Option("prefetch_depth", "prefetch_depth", int,
           "levels of subdirectories listed ahead of a tree walk (0 = off)"),
    Option("prefetch_concurrency", "prefetch_concurrency", _positive_int,
           "directory listings prefetched at once"),
    Option("cache_dir", "cache_dir", Path,
           "block cache and journal; default /var/cache/wancache/<host>-<export>"),
    Option("cache_size", "cache_size", parse_size, "block cache size limit"),
    Option("block_size", "block_size", parse_size, "block cache block size"),
    Option("readahead", "readahead", parse_size, "largest read-ahead window per open file"),
    Option("small_file", "small_file", parse_size, "files up to this size are fetched whole"),
    Option("dir_readahead", "dir_readahead", parse_size,
           "reading a small file cold also fetches its small neighbours, up to this much "
           "per directory (0 = off)"),
    Option("writeback", "writeback", parse_bool,
           "on: journal writes locally, flush in the background; off: write-through"),
    Option("writeback_delay", "writeback_delay", parse_duration,
           "hold new writes this long before flushing (temp files may die locally)"),
    Option("max_dirty", "max_dirty", parse_size, "unflushed bytes before writers wait"),
    Option("dirty_wait", "dirty_wait", parse_duration,
           "how long a writer waits for room under max_dirty before ENOSPC"),
    Option("ro", "read_only", parse_bool, "read-only mount", True),
    Option("allow_other", "allow_other", parse_bool, "let every local user use the mount", True),
    Option("fsname", "fsname", str, "name shown in /proc/mounts; default host:/export"),
    Option("metrics", "metrics", _metrics_addr, "Prometheus exporter HOST:PORT, or off"),
    Option("log_level", "log_level", _choice("debug", "info", "warning", "error"),
           "log level"),
    Option("debug", "debug", parse_bool, "log every RPC (implies log_level=debug)", True),
)
_BY_NAME = {o.name: o for o in OPTIONS}


def option_names() -> list[str]:
    """Every option we accept, for error messages."""
    return sorted(_BY_NAME)


def _defaults() -> dict[str, Any]:
    cfg = Config()
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def parse_spec(spec: str) -> tuple[str, str]:
    """'host:/export' -> (host, '/export'); IPv6 hosts go in brackets: '[::1]:/x'."""
    m = re.match(r"^\[([^\]]+)\]:(/.*)$", spec) or re.match(r"^([^:/\[\]]+):(/.*)$", spec)
    if not m:
        raise ConfigError(f"bad source {spec!r}: expected HOST:/EXPORT")
    return m.group(1), m.group(2).rstrip("/") or "/"


def split_options(text: str | Iterable[str]) -> list[str]:
    """'a=1,b' or ['a=1,b', 'c'] -> ['a=1', 'b', 'c']."""
    parts = [text] if isinstance(text, str) else list(text)
    return [p.strip() for part in parts for p in part.split(",") if p.strip()]


def parse_options(options: str | Iterable[str], cfg: Config | None = None) -> Config:
    """Apply `-o` options to `cfg` (a new default Config if None); ConfigError if bad."""
    cfg = cfg or Config()
    for item in split_options(options):
        name, sep, value = item.partition("=")
        name = name.strip()
        opt = _BY_NAME.get(name)
        if opt is None:
            if name in IGNORED_OPTIONS or item.startswith(IGNORED_PREFIXES):
                cfg.ignored.append(item)
                continue
            raise ConfigError(
                f"unknown option {name!r}; valid options: {', '.join(option_names())}")
        if not sep:
            if opt.flag_value is None:
                raise ConfigError(f"option {name!r} needs a value ({name}=...)")
            parsed = opt.flag_value
        else:
            try:
                parsed = opt.parse(value)
            except ValueError as exc:
                raise ConfigError(f"bad value for {name}: {value!r}: {exc}") from None
        if name == "actimeo":
            _set_actimeo(cfg, parsed)
        else:
            setattr(cfg, opt.attr, parsed)
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    if cfg.debug:
        cfg.log_level = "debug"
    if not cfg.cache:
        cfg.writeback = False    # pass-through means every write goes to the server
    if cfg.block_size < 4096 or cfg.block_size & (cfg.block_size - 1):
        raise ConfigError(f"block_size must be a power of two >= 4096, not {cfg.block_size}")
    for name in ("timeout", "timeo"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be > 0")
    if cfg.lease_min > cfg.lease_max:
        raise ConfigError("lease_min must not exceed lease_max")


def build_config(spec: str, mountpoint: str | Path, options: str | Iterable[str] = ()) -> Config:
    """The Config for `wancache mount SPEC MOUNTPOINT -o OPTIONS`."""
    host, export = parse_spec(spec)
    cfg = parse_options(options, Config(host=host, export=export, mountpoint=Path(mountpoint)))
    if not cfg.fsname:
        cfg.fsname = spec
    if cfg.cache_dir is None:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{host}-{export}").strip("_")
        cfg.cache_dir = Path("/var/cache/wancache") / safe
    return cfg


def options_table() -> str:
    """The README's options table (markdown), generated from OPTIONS."""
    defaults = _defaults()
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for o in OPTIONS:
        if o.name == "actimeo":
            default = ""
        elif o.flag_value is not None and o.attr and isinstance(defaults[o.attr], bool):
            default = "on" if defaults[o.attr] == o.flag_value else ""
        else:
            default = _show(defaults[o.attr]) if o.attr else ""
        shown = o.name if o.flag_value is not None else f"{o.name}=…"
        rows.append(f"| `{shown}` | {default} | {o.help} |")
    return "\n".join(rows)


def _show(value: Any) -> str:
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}s"
    if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"{value >> 30}G" if value % (1 << 30) == 0 else f"{value >> 20}M"
    if isinstance(value, int) and value >= 1 << 10 and value % (1 << 10) == 0:
        return f"{value >> 10}K"
    return str(value)
