import os
import pytest
from tests.conftest import MountFactory

@pytest.mark.parametrize("variant", range(4))
def test_silly_then_crash(mount_factory: MountFactory, allow_log_warnings, variant) -> None:
    m = mount_factory([], name="s")
    d = m.mountpoint
    fd1 = os.open(d / "d", os.O_RDWR | os.O_CREAT, 0o644)
    fd2 = os.open(d / "d", os.O_RDWR)
    if variant & 1:
        os.write(fd2, b"abc" * 1000)
    os.pread(fd1, 100, 1000)
    os.unlink(d / "d")
    m.kill()
    for fd in (fd1, fd2):
        try: os.close(fd)
        except OSError: pass
    m.start()
    if variant & 2:
        os.listdir(d)
        m.kill()
        m.start()
    print(os.listdir(d))
    m.flush()
    print(os.listdir(d))
    assert " ERROR " not in m.log()
