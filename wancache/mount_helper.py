"""`mount.wancache`: the mount(8) helper."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mount.wancache`."""
    print("mount.wancache: not yet implemented (see issue 9)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
