"""The shipped systemd units, and the README's fstab line as systemd reads it, pass
`systemd-analyze verify` (which needs no running systemd)."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from wancache import config

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "contrib" / "systemd"
GENERATOR = Path("/lib/systemd/system-generators/systemd-fstab-generator")


def verify(*units: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd; "
                    "scripts/bootstrap installs it)")
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stdout + proc.stderr


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def readme_fstab_line() -> str:
    text = (REPO / "README.md").read_text()
    lines = [ln.strip() for ln in text.splitlines()
             if re.match(r"^\S+:/\S* /\S+ wancache \S+ 0 0$", ln.strip())]
    assert lines, "README.md shows no fstab line for wancache"
    return lines[0]


def test_shipped_units_verify() -> None:
    mount = UNITS / "srv-projects.mount"
    automount = UNITS / "srv-projects.automount"
    verify(mount, automount)
    u = unit(mount)
    assert u["Mount"]["Type"] == "wancache"
    assert u["Mount"]["Where"] == "/srv/projects"
    options = u["Mount"]["Options"].split(",")
    assert "_netdev" in options
    assert "network-online.target" in u["Unit"]["After"]
    assert "network-online.target" in u["Unit"]["Wants"]
    assert u["Install"]["WantedBy"] == "remote-fs.target"
    assert unit(automount)["Automount"]["Where"] == "/srv/projects"
    # the unit's options are ours (or generic ones we ignore)
    config.build_config(u["Mount"]["What"], u["Mount"]["Where"], options)


def test_readme_fstab_line_becomes_units_that_verify(tmp_path: Path) -> None:
    line = readme_fstab_line()
    spec, where, fstype, options = line.split()[:4]
    assert fstype == "wancache"
    assert "_netdev" in options and "x-systemd.automount" in options
    config.build_config(spec, where, options)
    if not GENERATOR.exists():
        pytest.skip(f"{GENERATOR} not installed (Debian package systemd)")
    fstab = tmp_path / "fstab"
    fstab.write_text(line + "\n")
    out = tmp_path / "units"
    out.mkdir()
    proc = subprocess.run([str(GENERATOR), str(out), str(out), str(out)],
                          env={"SYSTEMD_FSTAB": str(fstab), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    name = subprocess.run(["systemd-escape", "-p", "--suffix=mount", where],
                          capture_output=True, text=True, check=True).stdout.strip()
    mount = out / name
    automount = mount.with_suffix(".automount")
    assert unit(mount)["Mount"]["Type"] == "wancache"
    assert (out / "remote-fs.target.wants" / automount.name).exists()   # a network mount
    verify(mount, automount)


def test_readme_documents_the_units() -> None:
    text = (REPO / "README.md").read_text()
    for name in ("contrib/systemd/srv-projects.mount", "contrib/systemd/srv-projects.automount",
                 "network-online.target", "_netdev"):
        assert name in text, name
