"""The FUSE edge: every exception becomes an errno here, and only here.

`errno_of()` is the one exception -> errno table of the file system: every
wancache error says its errno (NFS statuses map through
`nfs_backend.errors.NFS3ERR_ERRNO`), local ones are OSErrors.  `fuse_handler` wraps
each `Operations` method so that no exception can escape into pyfuse3, which would
end `pyfuse3.main()` and take the mount down for every user.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from wancache.errors import WancacheError

log = logging.getLogger("wancache.fs")
REQUESTS: Counter[str] = Counter()   # FUSE requests served, per handler

P = ParamSpec("P")
R = TypeVar("R")


def _leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def errno_of(exc: BaseException) -> int | None:
    """The errno for an expected failure, or None for a bug (answered EIO)."""
    exc = _leaf(exc)
    match exc:
        case pyfuse3.FUSEError():
            return exc.errno
        case WancacheError():
            return exc.errno           # NFS statuses, timeouts, unreachable server, ...
        case trio.TooSlowError():
            return errno.ETIMEDOUT
        case OSError() if exc.errno:
            return exc.errno           # local disk: ENOSPC, EDQUOT, EIO, ...
    return None


def fuse_error(exc: BaseException, what: str) -> pyfuse3.FUSEError:
    """The FUSEError to answer for `exc`; unexpected ones are logged with traceback."""
    err = errno_of(exc)
    if err is None:
        log.error("%s failed unexpectedly; answering EIO", what, exc_info=exc)
        return pyfuse3.FUSEError(errno.EIO)
    leaf = _leaf(exc)
    if err in (errno.EIO, errno.ETIMEDOUT, errno.ESTALE) and \
            not isinstance(leaf, pyfuse3.FUSEError):
        log.debug("%s: %s", what, leaf)
    return pyfuse3.FUSEError(err)


def fuse_handler(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Map every exception of an async Operations method through `errno_of`."""
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        REQUESTS[fn.__name__] += 1
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise fuse_error(exc, fn.__name__) from None
        except BaseExceptionGroup as group:
            # Cancelled inside a group means shutdown: let trio have it.
            if group.subgroup(trio.Cancelled) is not None:
                raise
            raise fuse_error(group, fn.__name__) from None
    return wrapper


def never_raises(fn: Callable[P, Awaitable[None]]) -> Callable[P, Awaitable[None]]:
    """For `forget`: log anything unexpected, never let it escape."""
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            await fn(*args, **kwargs)
        except Exception:
            log.exception("%s failed (ignored)", fn.__name__)
    return wrapper


def guard_operations(cls: type[Any]) -> type[Any]:
    """Class decorator: wrap every FUSE handler the class defines."""
    for name in dir(pyfuse3.Operations):
        if name.startswith("_") or name in ("init", "stacktrace"):
            continue
        method = cls.__dict__.get(name)
        if method is None or not callable(method):
            continue
        cls_method = never_raises(method) if name == "forget" else fuse_handler(method)
        setattr(cls, name, cls_method)
    return cls
