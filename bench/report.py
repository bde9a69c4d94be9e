"""Bench results as people read them: derived numbers, tables, JSON and a chart.

`derive` turns measured `Result`s into `Row`s: the time a whole step takes (measured,
or estimated from the part done before a timeout), the speed-up over the pass-through
baseline (`cache=off`), the speed relative to the Python-FUSE floor measured in the
same run, the share of the physical limit, and whether wancache meets its target.
`python -m bench.report FILE.json [--markdown]` prints a saved run again.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.wanem import LinkProfile
from bench.workloads import Result, Step

BASELINE = "cache=off"
FLOOR = "floor"
TARGET_CONFIG = "wancache"
COLORS = {"wancache": "#1f77b4", "cache=off": "#d62728", "floor": "#ff7f0e",
          "libnfs": "#7f7f7f", "limit": "#2ca02c"}
HEADERS = ("workload", "config", "time", "rate", "x pass-through", "x floor", "of limit",
           "RPCs", "peak RSS", "target")
RIGHT = {3, 4, 5, 6, 7, 8}   # numeric columns
MAX_ERROR = 60


@dataclass
class Row:
    """One line of the table: a step under one configuration, with derived numbers."""

    label: str
    workload: str
    step: str
    config: str
    status: str                      # ok | timeout | error | n/a
    seconds: float | None = None     # measured wall time (limit: computed)
    t_eff: float | None = None       # time of the whole step
    bound: str = ""                  # t_eff is exact (""), estimated ("~"), at least (">")
    rate: float | None = None        # units per second (bytes for "B/s")
    unit: str = ""
    limit: float | None = None
    speedup: float | None = None
    speedup_bound: str = ""          # "", "~", ">=", "<="
    floor_ratio: float | None = None  # rate / the floor's rate (same run)
    floor_bound: str = ""
    fraction: float | None = None    # limit / t_eff
    fraction_bound: str = ""
    rpcs: int | None = None
    rpcs_by_proc: dict[str, int] | None = None
    wan: dict[str, int] | None = None
    peak_rss: int | None = None
    target: str = ""
    target_met: bool | None = None
    target_note: str = ""
    error: str = ""
    done: int | None = None
    total: int | None = None


@dataclass
class Report:
    """A whole run: what, where and how it ran, and its rows."""

    meta: dict[str, Any]
    rows: list[Row] = field(default_factory=list)

    @property
    def errors(self) -> list[Row]:
        return [r for r in self.rows if r.status == "error"]

    def to_json(self) -> dict[str, Any]:
        return {**self.meta, "rows": [asdict(r) for r in self.rows]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        meta = {k: v for k, v in data.items() if k != "rows"}
        return cls(meta, [Row(**r) for r in data["rows"]])


# --------------------------------------------------------------------------- deriving


def effective(res: Result) -> tuple[float | None, str]:
    """The time of the whole step and how sure it is ("", "~" estimated, ">" at least)."""
    if res.status == "ok":
        return res.seconds, ""
    if res.status == "timeout" and res.seconds is not None:
        if res.done and res.total:
            return res.seconds * res.total / res.done, "~"
        return res.seconds, ">"
    return None, ""


def _speedup_bound(base: str, mine: str) -> str | None:
    """How sure base/mine is, given how sure each time is; None: unknown."""
    if base == ">" and mine == ">":
        return None
    if mine == ">":
        return "<="
    if base == ">":
        return ">="
    return "~" if "~" in (base, mine) else ""


def check_target(row: Row, step: Step, link: LinkProfile,
                 profile: str = "") -> tuple[bool | None, str]:
    """Whether the row meets its step's target, and the number that decides it."""
    t = step.target
    if t is None or row.t_eff is None:
        return None, ""
    if t.profile and profile != t.profile:
        return None, f"{t.profile} profile only"
    if t.kind == "floor":
        if row.floor_ratio is None:
            return None, "no floor"
        note = f"{_bound(row.floor_bound)}{row.floor_ratio:.2f}x"
        if row.floor_bound == "<=" and row.floor_ratio < t.value:
            return False, note
        if row.floor_bound in ("", "~"):
            return row.floor_ratio >= t.value, note
        return None, note
    exact_or_est = row.bound in ("", "~")
    if t.kind == "seconds":
        if row.bound == ">" and row.t_eff > t.value:
            return False, ""
        return (row.t_eff <= t.value, "") if exact_or_est else (None, "")
    if t.kind == "rpcs":
        return (None, "") if row.rpcs is None else (row.rpcs <= t.value, "")
    if row.rate is None:
        return None, ""
    if t.kind == "link":
        if link.down_mbit is None:
            return None, "unlimited link"
        share = row.rate / (link.down_mbit * 1e6 / 8)
        return share >= t.value, f"{share * 100:.0f}%"
    if t.kind == "rate-noread":
        reads = (row.rpcs_by_proc or {}).get("READ", 0)
        return row.rate >= t.value and reads == 0, f"{reads} READs"
    return row.rate >= t.value, ""


def derive(results: list[Result], steps: list[tuple[str, Step]], link: LinkProfile,
           configs: list[str], profile: str = "") -> list[Row]:
    """Rows for each (title, step) and configuration, in that order."""
    by_key = {(r.workload, r.step, r.config): r for r in results}
    rows = []
    for title, step in steps:
        limit = step.limit(link)
        mine = [_row(f"{title}: {step.label}", step, config, limit,
                     by_key.get((step.workload, step.name, config))) for config in configs]
        base = next((r for r in mine if r.config == BASELINE), None)
        floor = next((r for r in mine if r.config == FLOOR), None)
        for row in mine:
            if base is not None and base.rate and row.rate:
                sb = _speedup_bound(base.bound, row.bound)
                if sb is not None:
                    row.speedup, row.speedup_bound = row.rate / base.rate, sb
            if row.config != "limit" and floor is not None and floor.rate and row.rate:
                fb = _speedup_bound(floor.bound, row.bound)
                if fb is not None:
                    row.floor_ratio, row.floor_bound = row.rate / floor.rate, fb
            if row.config == TARGET_CONFIG and step.target is not None:
                row.target = step.target.text
                row.target_met, row.target_note = check_target(row, step, link, profile)
            rows.append(row)
    return rows


def _row(label: str, step: Step, config: str, limit: float, res: Result | None) -> Row:
    row = Row(label, step.workload, step.name, config, "n/a", unit=step.unit, limit=limit,
              total=step.total)
    if config == "limit":
        row.status, row.seconds, row.t_eff = "ok", limit, limit
    elif res is not None:
        row.status, row.seconds, row.error, row.done = res.status, res.seconds, res.error, res.done
        row.t_eff, row.bound = effective(res)
        row.rpcs_by_proc, row.wan, row.peak_rss = res.rpcs, res.wan, res.peak_rss
        row.rpcs = None if res.rpcs is None else sum(res.rpcs.values())
    # A step that runs for a set time: what it did, if it finished.
    units = step.total or (res.done if res is not None and res.status == "ok" else None)
    if row.t_eff and units is not None:
        row.rate = units / row.t_eff
    if row.t_eff and limit > 0 and config != FLOOR:     # the floor does not cross the WAN
        row.fraction = limit / row.t_eff
        row.fraction_bound = {">": "<=", "~": "~"}.get(row.bound, "")
    return row


# --------------------------------------------------------------------------- formatting


def fmt_seconds(s: float) -> str:
    """0, 850 us, 412 ms, 3.21 s, 45.2 s, 312 s."""
    if s == 0:
        return "0"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 10:
        return f"{s:.2f} s"
    return f"{s:.1f} s" if s < 100 else f"{s:.0f} s"


def _sig(v: float) -> str:
    """Three significant digits, without exponents."""
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _bound(b: str) -> str:
    return {">=": "≥", "<=": "≤"}.get(b, b)


def fmt_rate(row: Row) -> str:
    if row.rate is None:
        return "∞" if row.t_eff == 0 and row.status == "ok" else ""
    prefix = _bound({">": "<="}.get(row.bound, row.bound))
    if row.unit == "B/s":
        value, unit = (row.rate / 1e9, "GB/s") if row.rate >= 1e9 else (row.rate / 1e6, "MB/s")
        return f"{prefix}{_sig(value)} {unit}"
    return f"{prefix}{_sig(row.rate)} {row.unit}"


def fmt_time(row: Row) -> str:
    if row.status == "error":
        text = f"error: {row.error}"
        return text if len(text) <= MAX_ERROR else text[:MAX_ERROR - 3] + "..."
    if row.t_eff is None:
        return "n/a"
    if row.bound == ">":
        return f"timeout (>{fmt_seconds(row.t_eff)})"
    if row.bound == "~":
        return f"timeout (~{fmt_seconds(row.t_eff)} est.)"
    return fmt_seconds(row.t_eff)


def fmt_target(row: Row) -> str:
    if not row.target:
        return ""
    verdict = {True: "yes", False: "NO", None: "n/a"}[row.target_met]
    note = f" ({row.target_note})" if row.target_note else ""
    return f"{row.target}: {verdict}{note}"


def cells(row: Row) -> list[str]:
    """The table cells of `row` (the first one, its label, included)."""
    speed = "" if row.speedup is None else f"{_bound(row.speedup_bound)}{_sig(row.speedup)}x"
    floor = ("" if row.floor_ratio is None
             else f"{_bound(row.floor_bound)}{_sig(row.floor_ratio)}x")
    frac = ("" if row.fraction is None
            else f"{_bound(row.fraction_bound)}{_sig(row.fraction * 100)}%")
    rpcs = "" if row.rpcs is None else str(row.rpcs)
    rss = "" if row.peak_rss is None else f"{row.peak_rss / (1 << 20):.0f} MiB"
    return [row.label, row.config, fmt_time(row), fmt_rate(row), speed, floor, frac, rpcs,
            rss, fmt_target(row)]


def header_lines(report: Report) -> list[str]:
    m = report.meta
    machine = m.get("machine", {})
    kind = "quick run" if m.get("quick") else "full run"
    wall = m.get("wall_seconds")
    lines = [
        f"wancache bench: profile {m.get('profile')} ({m.get('link_text')}), {kind}, "
        f"step timeout {m.get('step_timeout', 0):g} s",
        f"machine: {machine.get('cpu')}, {machine.get('cores')} cores, Linux "
        f"{machine.get('kernel')}, Python {machine.get('python')}; wancache "
        f"{machine.get('commit') or 'unknown commit'}",
    ]
    if wall is not None:
        took = f"{wall:.0f} s" if wall < 120 else f"{wall / 60:.1f} min"
        lines.append(f"started {m.get('started')}, wall time {took}")
    return lines


NOTES = [
    "time: wall time of the step. timeout (>T): killed after T; timeout (~T est.): "
    "stopped at the step timeout, whole step extrapolated from the part done.",
    "x pass-through: time under cache=off / time (≥, ≤: one side timed out; ~: estimated).",
    "x floor: rate / the rate of the Python-FUSE floor (bench/passthrough.py over a local "
    "copy of the data, same run): 1x is as fast as a pass-through FUSE file system in "
    "Python can be.",
    "of limit: physical limit / time. limit = bytes / link bandwidth + dependent round "
    "trips, computed, not run; 0 = needs no WAN at all (the floor has no WAN: none).",
    "RPCs: the wancache daemon's own NFS call counters; libnfs: calls that crossed the "
    "emulator (NFS and MOUNT). peak RSS: the wancache daemon's VmHWM.",
    "page cache dropped: drop_caches empties the host's page cache too, so wancache reads "
    "its block cache back from the local disk; that row is bound by the disk's speed.",
]


def _notes(report: Report) -> list[str]:
    return NOTES + list(report.meta.get("notes", []))


def _grouped_cells(report: Report) -> list[list[str]]:
    """Each row's cells, the workload named only on its first row."""
    out: list[list[str]] = []
    last = None
    for row in report.rows:
        c = cells(row)
        if c[0] == last:
            c[0] = ""
        else:
            last = c[0]
        out.append(c)
    return out


def text_table(report: Report) -> str:
    """The table in fixed-width columns, with the run's header and notes."""
    rows = [list(HEADERS), *_grouped_cells(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    lines = [*header_lines(report), ""]
    for i, r in enumerate(rows):
        parts = [c.rjust(w) if j in RIGHT else c.ljust(w)
                 for j, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines += [f"  {n}" for n in _notes(report)]
    return "\n".join(lines)


def markdown_table(report: Report) -> str:
    """The table as GitHub markdown, with the run's header and notes."""
    def md(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = [f"{line}  " for line in header_lines(report)] + [""]
    lines.append("| " + " | ".join(HEADERS) + " |")
    lines.append("|" + "|".join(" ---: " if i in RIGHT else " --- "
                                for i in range(len(HEADERS))) + "|")
    for c in _grouped_cells(report):
        lines.append("| " + " | ".join(md(x) for x in c) + " |")
    lines.append("")
    lines += [f"- {n}" for n in _notes(report)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- files


def chart(report: Report, path: Path) -> None:
    """Log-scale bars of each step's time, one colour per configuration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    labels = list(dict.fromkeys(r.label for r in report.rows))
    configs = list(dict.fromkeys(r.config for r in report.rows))
    times = [r.t_eff for r in report.rows if r.t_eff]
    lo = 10 ** math.floor(math.log10(min(times) / 2)) if times else 1e-3
    hi = max(times) * 6 if times else 1.0
    height = 0.8 / max(1, len(configs))
    fig, ax = plt.subplots(figsize=(11, 1.5 + 0.32 * len(labels) * max(1, len(configs)) / 2))
    by_key = {(r.label, r.config): r for r in report.rows}
    for ci, config in enumerate(configs):
        ys: list[float] = []
        widths: list[float] = []
        notes: list[str] = []
        for li, label in enumerate(labels):
            row = by_key.get((label, config))
            y = li - 0.4 + (ci + 0.5) * height
            if row is None:
                continue
            if not row.t_eff:
                mark = {"error": "error", "n/a": "n/a"}.get(row.status, "0")
                ax.text(lo * 1.1, y, mark, va="center", fontsize=6, color=COLORS.get(config))
                continue
            ys.append(y)
            widths.append(row.t_eff - lo)
            notes.append({">": "timeout", "~": "est."}.get(row.bound, ""))
        bars = ax.barh(ys, widths, left=lo, height=height, label=config,
                       color=COLORS.get(config))
        for bar, note in zip(bars, notes, strict=True):
            if note:
                bar.set_hatch("//")
                bar.set_alpha(0.6)
                ax.text(bar.get_x() + bar.get_width() * 1.05, bar.get_y() + height / 2, note,
                        va="center", fontsize=6)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds, log scale (hatched: timed out, lower bound or estimate)")
    m = report.meta
    ax.set_title(f"wancache bench, profile {m.get('profile')} ({m.get('link_text')})",
                 fontsize=9)
    ax.legend(handles=[Patch(color=COLORS.get(c), label=c) for c in configs], fontsize=7,
              loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: Report, out: Path, stamp: str) -> list[Path]:
    """`bench-<profile>-<stamp>.json`, `latest.json` and `bench-<profile>.png` in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    profile = report.meta.get("profile", "custom")
    data = out / f"bench-{profile}-{stamp}.json"
    data.write_text(json.dumps(report.to_json(), indent=1, sort_keys=False) + "\n")
    shutil.copyfile(data, out / "latest.json")
    png = out / f"bench-{profile}.png"
    chart(report, png)
    return [data, out / "latest.json", png]


def main(argv: list[str] | None = None) -> int:
    """Print a saved run's table again."""
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("json", type=Path, help="a bench JSON file, e.g. OUT/latest.json")
    parser.add_argument("--markdown", action="store_true", help="print markdown")
    args = parser.parse_args(argv)
    try:
        report = Report.from_json(json.loads(args.json.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"bench.report: cannot read {args.json}: {exc}", file=sys.stderr)
        return 1
    print(markdown_table(report) if args.markdown else text_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
