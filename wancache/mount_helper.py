"""`mount.wancache`: the mount(8) helper, so `mount -t wancache`, fstab lines and
systemd mount units work.

mount(8) runs `/sbin/mount.wancache SPEC DIR [-sfnv] [-o OPTIONS]`.  The helper
validates everything it can, starts the daemon of `wancache mount` and returns
only once the mount serves, or exits non-zero with a one-line reason.

  -s  sloppy: ignore options we do not know (instead of failing)
  -f  fake: parse and validate only, mount nothing
  -n  do not write /etc/mtab (we never do: it is /proc/self/mounts)
  -v  verbose: say what is done
  -r / -w  read-only / read-write

Exit codes follow mount(8): 0 mounted, 1 bad usage or options, 32 mount failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from wancache import config
from wancache.config import ConfigError

PROG = "mount.wancache"
EX_USAGE, EX_FAIL = 1, 32


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: {message} (usage: {PROG} HOST:/EXPORT DIR [-sfnvrw] [-o OPTIONS])",
              file=sys.stderr)
        sys.exit(EX_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="mount(8) helper for wancache file systems")
    p.add_argument("spec", metavar="HOST:/EXPORT")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    p.add_argument("-s", dest="sloppy", action="store_true", help="ignore unknown options")
    p.add_argument("-f", dest="fake", action="store_true", help="validate only")
    p.add_argument("-n", dest="nomtab", action="store_true", help="no mtab (never written)")
    p.add_argument("-v", dest="verbose", action="store_true", help="verbose")
    p.add_argument("-r", dest="ro", action="store_true", help="mount read-only")
    p.add_argument("-w", dest="rw", action="store_true", help="mount read-write")
    p.add_argument("-t", dest="type", default="wancache", help="file system type")
    p.add_argument("-N", dest="namespace", help="mount namespace (not supported)")
    return p


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def known_options(items: list[str], *, verbose: bool) -> list[str]:
    """Sloppy mode: `items` without the options we do not know."""
    names = set(config.option_names())
    kept = []
    for item in items:
        name = item.partition("=")[0].strip()
        if name in names or name in config.IGNORED_OPTIONS or \
                item.startswith(config.IGNORED_PREFIXES):
            kept.append(item)
        elif verbose:
            print(f"{PROG}: ignoring unknown option {item!r} (sloppy)")
    return kept


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mount.wancache`."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.namespace:
        return _fail("mounting in another namespace (-N) is not supported", EX_USAGE)
    if args.type not in ("wancache", "fuse.wancache"):
        return _fail(f"not a wancache file system type: {args.type}", EX_USAGE)
    items = config.split_options(args.options)
    if args.ro:
        items.append("ro")
    if "remount" in items:
        return _fail("remount is not supported: unmount and mount again", EX_USAGE)
    if args.sloppy:
        items = known_options(items, verbose=args.verbose)
    mountpoint = os.path.abspath(args.dir)
    try:
        cfg = config.build_config(args.spec, mountpoint, items)
    except ConfigError as exc:
        return _fail(str(exc), EX_USAGE)
    from wancache.mount import MountPointError, check_mountpoint
    try:
        check_mountpoint(cfg.mountpoint)
    except MountPointError as exc:
        if not (args.fake and "busy" in str(exc)):   # -f may record an existing mount
            return _fail(str(exc), EX_USAGE if "does not exist" in str(exc) else EX_FAIL)
    if args.verbose:
        shown = ",".join(items) or "defaults"
        verb = "would mount" if args.fake else "mounting"
        print(f"{PROG}: {verb} {cfg.spec} on {mountpoint} (options {shown}; cache in "
              f"{cfg.cache_dir})")
    if args.fake:
        return 0
    from wancache.cli import daemon_argv, run_daemon
    rc = run_daemon(daemon_argv(args.spec, mountpoint, items), prog=PROG)
    if rc == 0:
        if args.verbose:
            print(f"{PROG}: {cfg.spec} mounted on {mountpoint}")
        return 0
    return EX_USAGE if rc == 2 else EX_FAIL


if __name__ == "__main__":
    sys.exit(main())
