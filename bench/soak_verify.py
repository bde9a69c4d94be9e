"""The end of a soak: does the server hold exactly what the workloads acknowledged?

The server is read through a `cache=off` wancache mount connected straight to it (no
WAN, no caches: every call goes to the server), never from ganesha's disk.  Each
workload's area is compared with its oracle: names, types, modes, owners, link
counts and symlink targets, and the SHA-256 of every regular file (git's index, which
holds stat data, only has to exist).  Files that differ are read once more with
libnfs (`nfs-cat`, an independent NFS client), so a finding never rests on wancache's
own read path alone.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    """What is compared of one path."""

    kind: str          # dir, file, symlink, fifo, other
    mode: int
    uid: int
    gid: int
    size: int = 0      # regular files
    nlink: int = 0     # regular files
    digest: str = ""   # regular files ("-": content not compared)
    target: str = ""   # symlinks


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "fifo" if stat.S_ISFIFO(mode) else "other"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: Path, unchecked: frozenset[str] = frozenset()) -> dict[str, Entry]:
    """Every path below `root` (relative), without following symlinks."""
    out: dict[str, Entry] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        for name in sorted(os.listdir(root / rel) if rel else os.listdir(root)):
            path_rel = f"{rel}/{name}" if rel else name
            path = root / path_rel
            st = os.lstat(path)
            kind = _kind(st.st_mode)
            entry = Entry(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            if kind == "file":
                digest = "-" if name in unchecked else sha256(path)
                entry = Entry(kind, entry.mode, st.st_uid, st.st_gid, st.st_size,
                              st.st_nlink, digest)
            elif kind == "symlink":
                entry = Entry(kind, entry.mode, st.st_uid, st.st_gid,
                              target=os.readlink(path))
            elif kind == "dir":
                stack.append(path_rel)
            out[path_rel] = entry
    return out


@dataclass
class Diff:
    """How a tree on the server differs from what was acknowledged."""

    area: str
    files: int = 0                 # acknowledged regular files
    bytes: int = 0                 # ... and their bytes
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    wrong_content: list[str] = field(default_factory=list)   # paths whose bytes differ
    lost_bytes: int = 0            # acknowledged bytes not on the server as written
    libnfs: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.missing or self.extra or self.changed)

    def lines(self, limit: int = 5) -> list[str]:
        out = []
        for what, items in (("missing", self.missing), ("extra", self.extra),
                            ("changed", self.changed), ("libnfs", self.libnfs)):
            if items:
                more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
                out.append(f"{self.area}: {what}: {'; '.join(items[:limit])}{more}")
        return out


def in_scope(path: str, patterns: list[str]) -> bool:
    """Whether `path` is one of `patterns` (fnmatch) or below one of them."""
    return any(fnmatch.fnmatchcase(path, p) or path.startswith(p + "/") for p in patterns)


def excuse(want: dict[str, Entry], have: dict[str, Entry], rel: str, patterns: list[str]
           ) -> tuple[dict[str, Entry], dict[str, Entry]]:
    """For the round directory `rel` whose last step failed half-way: drop from `want`
    what that step may have changed (`patterns`, relative to `rel`), and from `have`
    what `want` does not name below `rel` (the failed step may have left it)."""
    prefix = f"{rel}/" if rel else ""

    def below(path: str) -> str | None:
        if not rel:
            return path
        return path[len(prefix):] if path.startswith(prefix) else None

    want = {p: e for p, e in want.items()
            if (sub := below(p)) is None or not in_scope(sub, patterns)}
    have = {p: e for p, e in have.items() if below(p) is None or p in want}
    return want, have


def compare(area: str, want: dict[str, Entry], have: dict[str, Entry]) -> Diff:
    """`have` (the server) against `want` (acknowledged)."""
    d = Diff(area)
    for rel, w in sorted(want.items()):
        if w.kind == "file":
            d.files += 1
            d.bytes += w.size
        h = have.get(rel)
        if h is None:
            d.missing.append(rel)
            d.lost_bytes += w.size
            continue
        if h.kind != w.kind:
            d.changed.append(f"{rel}: {w.kind} is {h.kind} on the server")
            d.lost_bytes += w.size
            continue
        fields = [f for f in ("mode", "uid", "gid", "size", "nlink", "target")
                  if getattr(w, f) != getattr(h, f)]
        if w.digest not in ("", "-") and w.digest != h.digest:
            fields.append("content")
            d.wrong_content.append(rel)
        if fields:
            d.changed.append(f"{rel}: {', '.join(fields)} "
                             f"(want {_show(w, fields)}, server {_show(h, fields)})")
            if "content" in fields or "size" in fields:
                d.lost_bytes += w.size
    d.extra = sorted(set(have) - set(want))
    return d


def _show(e: Entry, fields: list[str]) -> str:
    parts = []
    for f in fields:
        v = e.digest[:12] if f == "content" else getattr(e, f)
        parts.append(f"{f}={oct(int(v)) if f == 'mode' else v}")
    return " ".join(parts)


def compare_bytes(area: str, want: dict[str, bytes], root: Path) -> Diff:
    """A flat directory of the server against the exact contents it must hold."""
    d = Diff(area, files=len(want), bytes=sum(map(len, want.values())))
    names = set(os.listdir(root))
    for name, data in sorted(want.items()):
        if name not in names:
            d.missing.append(name)
            d.lost_bytes += len(data)
            continue
        got = (root / name).read_bytes()
        if got != data:
            d.changed.append(f"{name}: {len(got)} bytes, want {len(data)}")
            d.lost_bytes += len(data)
    d.extra = sorted(names - set(want))
    return d


def libnfs_check(d: Diff, url: Callable[[str], str], want: dict[str, Entry]) -> None:
    """Read the first files whose bytes differ again with nfs-cat: does libnfs agree?"""
    for rel in d.wrong_content[:10]:
        w = want[rel]
        proc = subprocess.run(["nfs-cat", url(rel)], capture_output=True, timeout=120,
                              check=False)
        if proc.returncode != 0:
            d.libnfs.append(f"{rel}: nfs-cat failed: {proc.stderr.decode()[-100:]!r}")
            continue
        if hashlib.sha256(proc.stdout).hexdigest() == w.digest:
            d.libnfs.append(f"{rel}: libnfs reads the acknowledged bytes (the cache=off "
                            "mount read them wrong)")
        else:
            d.libnfs.append(f"{rel}: libnfs agrees, the server holds other bytes")
