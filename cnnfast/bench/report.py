"""The report: the printed table, the busy-machine warning, ``--compare`` of two reports, and the
scaling sweep's table and plot."""

from __future__ import annotations

import json
import math

from cnnfast.bench.checks import REFERENCE_MAX_REPEATS

SCHEMA = "cnnfast-bench/2"
# Schema 1 reported ``vs_torch = t_torch / t_path`` (> 1: faster); schema 2 uses the time ratio
# everywhere (README, issues, this report): ``time_vs_torch = t_path / t_torch`` (< 1: faster).
OLD_SCHEMAS = ("cnnfast-bench/1",)


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _status(row: dict) -> str:
    if row["status"] == "ok":
        if row["path"] == "reference":
            return "oracle"
        if row["check_batch"] is not None and row["check_batch"] != row["batch"]:
            return f"ok@{row['check_batch']}"
        return "ok"
    return row["status"]


def busy_note(report: dict) -> str | None:
    """A warning when other processes competed for the cores: before the run, more than half
    the threads' worth of CPU used by others over one second (``cpu_busy_start``; where that is
    missing, a 1-minute load above half the threads), or during it a 1-minute load above the
    threads this run uses plus one."""
    m = report["machine"]
    threads = m.get("threads_available") or 1
    busy = m.get("cpu_busy_start")
    start = busy if busy is not None else (m.get("load_avg_start") or [0])[0]
    what = "CPUs busy" if busy is not None else "1-minute load"
    during = [r["load_1m"] for r in report["results"] if r.get("load_1m") is not None]
    peak = max(during, default=0.0)
    if start > threads / 2 or peak > threads + 1:
        return (f"the machine was busy ({what} {start:.1f} at the start, 1-minute load up to "
                f"{peak:.1f} during the run, on {threads} threads): multi-threaded timings, "
                "PyTorch's most of all, are inflated; see each row's load_1m in the JSON")
    return None


def ceiling_lines(ceiling: dict | None) -> list[str]:
    """The header line naming the machine's measured FMA ceiling (absent from older reports)."""
    if not ceiling:
        return []
    return [f"FMA ceiling (float32, measured): {ceiling['fma_1']:.0f} GFLOP/s on 1 thread, "
            f"{ceiling['fma_all']:.0f} on {ceiling['threads']} ({ceiling['target']}); sgemm on "
            f"1 thread: BLAS {ceiling['blas_1']:.0f}, cnnfast {ceiling['own_1']:.0f}; "
            f"'of ceil' = GFLOP/s over {ceiling['threads']} x the 1-thread ceiling "
            f"({ceiling['fma_1'] * ceiling['threads']:.0f})"]


def format_table(report: dict) -> str:
    rows = report["results"]
    m = report["machine"]
    threads = m.get("threads", {})
    isolated = m.get("isolation", "process") == "process"
    lines = [
        f"cnnfast bench  {report['created']}  cnnfast {report['versions']['cnnfast']}",
        f"machine: {m['cpu']}, {m['cores']} cores ({m['threads_available']} available)"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
        + (f"; torch {report['versions']['torch']} with {threads['torch']} threads"
           if "torch" in threads else "")
        + (f"; numba {threads['numba']} threads ({threads.get('numba_layer', '?')} layer)"
           if "numba" in threads else "")
        + ("; glibc malloc thresholds raised (cnnfast.cpu._malloc)"
           if m.get("malloc", {}).get("applied") else "")
        + "".join(f"; {b['library']} {b['version']} with {b['architecture']} kernels"
                  for b in m.get("blas", [])[:1])
        + (f" (OPENBLAS_CORETYPE={m['thread_env']['OPENBLAS_CORETYPE']})"
           if m.get("thread_env", {}).get("OPENBLAS_CORETYPE") else ""),
        *ceiling_lines(m.get("ceiling")),
        f"each path in {'its own worker process' if isolated else 'this one process'}; "
        "median of alternating repeats (warm-up excluded); 1st = first call incl. JIT compile "
        "(at the check batch); time/torch = t_path / t_torch (< 1: faster than PyTorch); "
        "cpu/torch: the same for the worker's CPU time (all its threads), less sensitive to "
        "other load",
    ]
    busy = busy_note(report)
    if busy:
        lines.append(f"WARNING: {busy}")
    if not report["options"]["reference_all"]:
        most = REFERENCE_MAX_REPEATS - (1 if report["options"]["quick"] else 0)
        lines.append("reference: timed only on r18-28/tiny shapes and the SmallCNN step, at most "
                     f"{most} repeats (--reference-all: everywhere); always the oracle")
    header = ("op", "shape", "path", "check", "1st", "median", "IQR", "GFLOP/s", "of ceil",
              "time/torch", "cpu/torch")
    table = []
    skipped: dict[tuple[str, str], int] = {}
    last_id = None
    for row in rows:
        if row["status"] == "skipped":
            key = (row["path"], row["reason"] or "?")
            skipped[key] = skipped.get(key, 0) + 1
            continue
        first = row["id"] != last_id
        last_id = row["id"]
        op = f"{row['op']} {row['phase']}" if first else ""
        shape = f"{row['shape_id']} {row['shape']}" if first else ""
        if row["status"] in ("WRONG", "ERROR"):
            table.append((op, shape, row["path"], row["status"], _fmt_time(row["first_call_s"]),
                          "", "", "", "", "", "", row["reason"] or ""))
            continue
        table.append((op, shape, row["path"], _status(row), _fmt_time(row["first_call_s"]),
                      _fmt_time(row.get("median_s")), _fmt_time(row.get("iqr_s")),
                      _fmt(row.get("gflops"), ".1f"), _fmt(row.get("ceiling_share"), ".0%"),
                      _fmt(row.get("time_vs_torch"), ".2f"),
                      _fmt(row.get("cpu_vs_torch"), ".2f"), None))
    if table:
        widths = [max(len(str(r[i])) for r in table + [header]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines.append("")
        lines.append(fmt.format(*header))
        lines.append("  ".join("-" * w for w in widths))
        for r in table:
            if r[-1] is not None:   # WRONG or ERROR: the reason instead of the timings
                cells = [f"{v:<{w}}" if i < 4 else f"{v:>{w}}"
                         for i, (v, w) in enumerate(zip(r[:5], widths))]
                lines.append("  ".join(cells) + "  " + r[-1])
            else:
                lines.append(fmt.format(*r[:-1]))
    steps = [r for r in rows if r["op"] == "step" and r["status"] == "ok"]
    if steps:
        lines += ["", "training step memory (one step: RSS peak above the start; NumPy "
                  "allocations traced by tracemalloc)"]
        for r in steps:
            traced = r.get("peak_traced_mb")
            lines.append(f"  {r['shape_id']:<12} {r['path']:<10} peak RSS "
                         f"{_fmt(r.get('peak_rss_mb'), '8.1f')} MB"
                         + ("" if traced is None else f"   traced {traced:8.1f} MB"))
    if report["memory"]:
        lines += ["", "memory growth (RSS after N steps minus before, after 3 settling steps)"]
        for r in report["memory"]:
            if "error" in r:
                lines.append(f"  {r['model']:<12} {r['path']:<10} ERROR {r['error']}")
            else:
                lines.append(f"  {r['model']:<12} {r['path']:<10} {r['steps']} steps: "
                             f"{r['growth_mb']:+.1f} MB  (RSS {r['rss_mb']:.0f} MB, "
                             f"{r['seconds']:.1f} s)")
    if skipped:
        lines += ["", "not run:"]
        for (path, reason), count in skipped.items():
            lines.append(f"  {path}: {reason} ({count} item{'s' if count > 1 else ''})")
    lines.append("")
    lines.append(f"wall time {report['wall_s']:.1f} s")
    return "\n".join(lines)


def load_report(path: str) -> dict:
    try:
        with open(path) as f:
            report = json.load(f)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(report, dict) or report.get("schema") not in (SCHEMA,) + OLD_SCHEMAS:
        raise UsageError(f"{path} is not a cnnfast bench report (schema {SCHEMA})")
    if report["schema"] in OLD_SCHEMAS:   # speed ratio -> time ratio
        for row in report.get("results", []):
            v = row.pop("vs_torch", None)
            row["time_vs_torch"] = 1.0 / v if v else None
    return report


def compare_reports(old: dict, new: dict, threshold: float = 0.10,
                    metric: str = "median") -> tuple[list[dict], str]:
    """Match rows by (item id, path) and flag regressions: a path that was ok and now is WRONG or
    ERROR, or one slower by more than ``threshold`` (a fraction). ``metric="median"`` compares
    median times; ``"time_vs_torch"`` compares each path's time relative to PyTorch in the same
    run (``slowdown = new time_vs_torch / old time_vs_torch``), which cancels drift in the
    machine's speed between the two runs (the PyTorch rows themselves are then not compared)."""
    relative = metric in ("time_vs_torch", "vs_torch")
    old_rows = {(r["id"], r["path"]): r for r in old["results"]}
    lines = []
    if old["machine"].get("cpu") != new["machine"].get("cpu"):
        lines.append(f"note: different machines ({old['machine'].get('cpu')} vs "
                     f"{new['machine'].get('cpu')})")
    compared = []
    for r in new["results"]:
        o = old_rows.get((r["id"], r["path"]))
        if o is None:
            continue
        entry = {"id": r["id"], "path": r["path"], "old_s": o.get("median_s"),
                 "new_s": r.get("median_s"), "ratio": None, "regression": False, "why": ""}
        if relative:
            before, after = o.get("time_vs_torch"), r.get("time_vs_torch")
            slowdown = after / before if before and after else None
            if r["path"] in ("torch", "cudnn"):
                slowdown = None
        else:
            before, after = entry["old_s"], entry["new_s"]
            slowdown = after / before if before and after else None
        if o["status"] == "ok" and r["status"] in ("WRONG", "ERROR"):
            entry["regression"], entry["why"] = True, f"now {r['status']}: {r['reason']}"
        elif slowdown is not None:
            entry["ratio"] = slowdown
            if slowdown > 1 + threshold:
                entry["regression"] = True
                entry["why"] = f"{(slowdown - 1) * 100:.0f}% slower" + (
                    " relative to torch" if relative else "")
        else:
            continue
        compared.append(entry)
    regressions = [e for e in compared if e["regression"]]
    what = "relative to PyTorch in each run" if relative else "median times"
    lines.append(f"compared {len(compared)} figures ({what}); threshold {threshold * 100:.0f}% "
                 "slower; slowdown = new / old (> 1: slower)")
    width = max((len(e["id"]) for e in compared), default=10)
    for e in sorted(compared, key=lambda e: -(e["ratio"] or math.inf)):
        flag = "REGRESSION" if e["regression"] else ""
        ratio = "-" if e["ratio"] is None else f"{e['ratio']:.2f}x"
        lines.append(f"  {e['id']:<{width}}  {e['path']:<10} {_fmt_time(e['old_s']):>10} -> "
                     f"{_fmt_time(e['new_s']):>10}  {ratio:>6}  {flag} {e['why']}".rstrip())
    lines.append(f"{len(regressions)} regression(s)" if regressions else "no regressions")
    return regressions, "\n".join(lines)


# --- the scaling sweep (cnnfast.bench.scaling) ----------------------------------------------------

def format_scaling(report: dict) -> str:
    repeats = report["options"]["repeats"]
    lines = [f"cnnfast bench --scaling  {report['created']}  (median of {repeats} alternating "
             "steps; time/torch < 1: faster than PyTorch)",
             f"{'model':<12} {'sweep':<8} {'shape':<14} {'batch':>5} {'thr':>3}  "
             f"{'path':<6} {'step':>10} {'per sample':>11} {'time/torch':>10}"]
    for r in report["points"]:
        shape = "x".join(map(str, r["input_shape"][1:]))
        if r["status"] != "ok":
            lines.append(f"{r['model']:<12} {r['sweep']:<8} {shape:<14} {r['batch']:>5} "
                         f"{r['threads']:>3}  {r['path']:<6} {r['status']} {r['reason']}")
            continue
        ratio = "-" if r["time_vs_torch"] is None else f"{r['time_vs_torch']:.2f}"
        lines.append(f"{r['model']:<12} {r['sweep']:<8} {shape:<14} {r['batch']:>5} "
                     f"{r['threads']:>3}  {r['path']:<6} {r['median_s'] * 1e3:>8.1f}ms "
                     f"{r['median_s'] * 1e3 / r['batch']:>9.2f}ms {ratio:>10}")
    lines.append(f"wall time {report['wall_s']:.1f} s")
    return "\n".join(lines)


def plot_scaling(report: dict, path: str) -> None:
    """A PNG: one panel per (model, sweep), step time (batch sweep: per sample) per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cnnfast._io import atomic_write

    panels = sorted({(r["model"], r["sweep"]) for r in report["points"]})
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (model, sweep) in zip(axes.flat, panels):
        pts = [r for r in report["points"] if r["model"] == model and r["sweep"] == sweep
               and r["status"] == "ok"]
        xname = {"batch": "batch", "size": "size", "threads": "threads"}[sweep]
        for p in sorted({r["path"] for r in pts}):
            mine = sorted((r for r in pts if r["path"] == p), key=lambda r: r[xname])
            ys = [r["median_s"] * 1e3 / (r["batch"] if sweep == "batch" else 1) for r in mine]
            ax.plot([r[xname] for r in mine], ys, marker="o", label=p)
        ax.set_title(f"{model}: {sweep}")
        ax.set_xlabel(xname)
        ax.set_ylabel("ms per sample" if sweep == "batch" else "ms per step")
        if sweep in ("batch", "size"):
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend()
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"training-step scaling, {report['machine'].get('cpu')}")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
