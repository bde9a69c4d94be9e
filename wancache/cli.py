"""The `wancache` command."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of `wancache`."""
    print("wancache: not yet implemented (see issues 4 and 9)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
