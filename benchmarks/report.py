"""Report: the printed tables, the README's markdown summary, the PNG, and the machine record.

See benchmarks/run.py for the layout of the suite.

Everything here reads the results dictionary a run builds (and latest.json holds): workloads in
the order they ran, each with "cases" (a name and rows per peer) or, for (e), "rows"; then the
targets. A workload record may carry "x" (one value per case: drawn as curves, not bars),
"draw": "overlay" (drawn onto the lockstep curves of (d) instead of its own panel),
"summary": False (left out of the markdown), and "reference" (what its ratios are to).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import harness as H
import peers as P
import targets as T

STATUS_WIDTH = 12  # "STRETCH FAIL"


def machine_info() -> dict[str, Any]:
    import cffi

    info: dict[str, Any] = {
        "python": sys.version,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "os_page_size": P.OS_PAGE,
        "libc": " ".join(platform.libc_ver()),
        "cffi": cffi.__version__,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "libraries": P.library_paths(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        pass
    for mod in ("numpy", "pyarrow", "psutil", "goheap", "matplotlib", "tqdm"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = __import__(mod)
            except Exception:
                continue
        info[mod] = getattr(m, "__version__", "?")
    try:
        import psutil

        info["threads_in_process"] = psutil.Process().num_threads()
    except ImportError:
        pass
    for pkg in ("libjemalloc2", "libmimalloc2.0", "libtcmalloc-minimal4", "electric-fence", "duma"):
        try:
            v = subprocess.run(
                ["dpkg-query", "-W", "-f", "${Version}", pkg],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if v.returncode == 0:
                info[pkg] = v.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "-C", str(P.HERE), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def case_workloads(results: dict[str, Any]) -> list[str]:
    """The keys of the workloads measured as cases (all but e), in the order they ran."""
    return [k for k, wl in results["workloads"].items() if wl.get("cases")]


def row_names(wl: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for case in wl["cases"]:
        names += [n for n in case["rows"] if n not in names]
    return names


def extra_bases(wl: dict[str, Any]) -> list[str]:
    """The bases other than the first that a workload's ratios were paired with."""
    out: list[str] = []
    for case in wl["cases"]:
        for row in case["rows"].values():
            out += [
                k[len("ratio_vs_") :]
                for k in row
                if k.startswith("ratio_vs_")
                and not k.endswith("spread_pct")
                and k[len("ratio_vs_") :] not in out
            ]
    return out


def fmt_value(t: dict[str, Any]) -> str:
    v = t["value"]
    if v is None:
        return "n/a"
    return f"{v:+.1%}" if t["workload"] == "e" else f"{v:.2f}x"


# ---------------------------------------------------------------------------------------------
# Printed tables


def print_case_table(wl: dict[str, Any], ratio_key: str = "ratio") -> None:
    print(f"\n{wl['title']}  [{wl['unit']}: median ±spread, ratio]")
    names = row_names(wl)
    header = f"{'':22}" + "".join(f"{case['case']:>22}" for case in wl["cases"])
    print(header)
    for name in names:
        cells = []
        for case in wl["cases"]:
            row = case["rows"].get(name)
            if row is None:
                cells.append(f"{'-':>22}")
                continue
            ratio = row.get(ratio_key)
            r = f"{ratio:5.2f}x" if ratio is not None else "      "
            cells.append(f"{H.fmt_ns(row['median']):>9} ±{row['spread_pct']:2.0f}% {r}")
        print(f"{name:22}" + "".join(cells))
    for base in extra_bases(wl):
        k = f"ratio_vs_{base}"
        print(f"  ratio to {base}:")
        for n in names:
            if n != base:
                print(
                    f"  {n:20}"
                    + "".join(
                        f"{case['rows'][n][k]:>21.2f}x"
                        if k in case["rows"].get(n, {})
                        else f"{'-':>22}"
                        for case in wl["cases"]
                    )
                )


def print_rss_table(e: dict[str, Any]) -> None:
    print(f"\n{e['title']}  [MiB; ratio to cffi-libc after free / after release]")
    print(
        f"{'':22}{'before':>10}{'allocated':>11}{'freed':>10}{'released':>10}"
        f"{'freed x':>9}{'rel. x':>9}  release call"
    )
    for name, r in e["rows"].items():
        print(
            f"{name:22}{r['rss_before'] / H.MiB:10.1f}{r['rss_allocated'] / H.MiB:11.1f}"
            f"{r['rss_freed'] / H.MiB:10.1f}{r['rss_released'] / H.MiB:10.1f}"
            f"{r.get('rss_freed_ratio', float('nan')):9.2f}"
            f"{r.get('rss_released_ratio', float('nan')):9.2f}  {r['release'] or '-'}"
        )


def print_table(results: dict[str, Any]) -> None:
    wls = results["workloads"]
    for key in case_workloads(results):
        print_case_table(wls[key])
        if key == "d_spans":
            for name in ("goheap", "goheap zero=False"):
                print(
                    f"  {name} cost vs fewest free spans: "
                    + ", ".join(
                        f"{c['case']}: {c['rows'][name]['vs_fewest']:.2f}x"
                        for c in wls[key]["cases"]
                        if "vs_fewest" in c["rows"].get(name, {})
                    )
                )
    if "e" in wls:
        print_rss_table(wls["e"])
    print("\nTargets (never loosened; a failing target is reported, not hidden):")
    for t in results["targets"]:
        info = f"  [{t['info']}]" if t["info"] else ""
        print(
            f"  {t['status']:{STATUS_WIDTH}}  {t['target']:56} {fmt_value(t):>9}  "
            f"{t['detail']}{info}"
        )
    for s in results.get("skipped", []):
        print(f"  skipped {s['peer']}: {s['reason']}")
    n = T.counts(results["targets"])
    print("targets: " + ", ".join(f"{v} {k}" for k, v in sorted(n.items())))


# ---------------------------------------------------------------------------------------------
# The PNG


def plot(results: dict[str, Any], path: Path) -> str | None:
    """Bars of every ratio per case, curves for workloads with "x", and the RSS panel; None when
    the file was written, otherwise why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib is not installed ({e}); no PNG"
    wls = results["workloads"]
    keys = case_workloads(results)
    bar_keys = [k for k in keys if "x" not in wls[k]]
    line_keys = [k for k in keys if "x" in wls[k] and wls[k].get("draw") != "overlay"]
    has_e = bool("e" in wls and wls["e"]["rows"])
    panels = len(bar_keys) + len(line_keys) + has_e
    if panels == 0:
        return "nothing to plot"
    cols = 2
    rows = (panels + 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(16, 4.6 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    palette = [*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors]
    fixed = {"goheap": "black", "goheap zero=False": "dimgray", "goheap efence": "crimson"}
    all_names: list[str] = []
    for k in bar_keys + line_keys:
        all_names += [n for n in row_names(wls[k]) if n not in all_names and n not in fixed]
    color: dict[str, Any] = {n: palette[i % len(palette)] for i, n in enumerate(all_names)}
    color.update(fixed)
    axes_left = iter(flat)
    for k in bar_keys:
        bars(next(axes_left), wls[k], color)
    for k in line_keys:
        curves(next(axes_left), k, wls, color)
    if has_e:
        rss_bars(next(axes_left), wls["e"])
    for ax in axes_left:
        ax.axis("off")
    n = T.counts(results["targets"])
    status = ", ".join(f"{v} {k}" for k, v in sorted(n.items()))
    fig.suptitle(
        f"goheap benchmarks ({'quick' if results['config']['quick'] else 'full'} run, "
        f"{results.get('date', '')}): targets {status}",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def bars(ax: Any, wl: dict[str, Any], color: dict[str, Any]) -> None:
    names = row_names(wl)
    width = 0.85 / max(1, len(names))
    for j, n in enumerate(names):
        xs, ys = [], []
        for ci, case in enumerate(wl["cases"]):
            if n in case["rows"] and case["rows"][n].get("ratio") is not None:
                xs.append(ci + (j - len(names) / 2 + 0.5) * width)
                ys.append(case["rows"][n]["ratio"])
        ax.bar(xs, ys, width, label=n, color=color.get(n))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(wl["cases"])), [c["case"] for c in wl["cases"]], fontsize=8)
    ax.set_title(wl["title"], fontsize=9)
    ax.set_ylabel(f"ratio to {wl.get('reference', P.REFERENCE)} (log)")
    ax.legend(fontsize=6, ncol=3)


def curves(ax: Any, k: str, wls: dict[str, Any], color: dict[str, Any]) -> None:
    wl = wls[k]
    for n in row_names(wl):
        pts = [
            (x, c["rows"][n]["median"])
            for x, c in zip(wl["x"], wl["cases"], strict=True)
            if n in c["rows"]
        ]
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            label=n,
            color=color.get(n),
            linewidth=2.5 if n.startswith("goheap") else 1.2,
        )
    interleaved = wls.get("d_flat")
    if interleaved and k in ("d_rt", "d_batch"):
        case = interleaved["cases"][0 if k == "d_rt" else 1]
        ax.plot(
            interleaved["x"],
            [case["rows"][H.fmt_size(x)]["median"] for x in interleaved["x"]],
            linestyle="--",
            marker="s",
            color="black",
            label="goheap, one heap per size, interleaved",
        )
    ax.set_xscale("log")
    if k == "d_spans":  # zeroed and zero=False rows are 100x apart: each must show its slope
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)  # linear from zero: flat must look flat, a rise must show
    ax.set_xlabel("free spans" if k == "d_spans" else "live heap (bytes)")
    ax.set_ylabel(wl["unit"])
    ax.set_title(wl["title"], fontsize=9)
    ax.legend(fontsize=7)


def rss_bars(ax: Any, e: dict[str, Any]) -> None:
    rows_e = e["rows"]
    stages = ("rss_before", "rss_allocated", "rss_freed", "rss_released")
    width = 0.2
    for j, st in enumerate(stages):
        ax.bar(
            [x + (j - 1.5) * width for x in range(len(rows_e))],
            [r[st] / H.MiB for r in rows_e.values()],
            width,
            label=st[4:],
        )
    ax.set_xticks(range(len(rows_e)), list(rows_e), rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(e["title"], fontsize=9)
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------------------------
# The README's summary


def markdown(results: dict[str, Any]) -> str:
    """The README's summary of a results file: targets, then every ratio to the reference."""
    m = results.get("machine", {})
    out = [
        f"Run of {results.get('date', '?')} at commit {m.get('git_commit', '?')[:10]} "
        f"({'quick' if results['config']['quick'] else 'full'}; {m.get('cpu', '?')}, "
        f"{m.get('cpus', '?')} CPUs, Python {m.get('python', '?').split()[0]}).",
        "",
        "| target | measured | limit | status |",
        "|---|---|---|---|",
    ]
    for t in results["targets"]:
        limit = f"{t['limit']:.0%}" if t["workload"] == "e" else f"{t['limit']}x"
        out.append(f"| {t['target']} | {fmt_value(t)} | {limit} | {t['status']} |")
    for key in case_workloads(results):
        wl = results["workloads"][key]
        if not wl.get("summary", key not in ("d_rt", "d_batch")):  # older files lack "summary"
            continue
        # Older results files have no "reference" on (g).
        ref = wl.get("reference", "C-loop glibc" if key == "g" else P.REFERENCE)
        out += markdown_cases(wl, f"ratio to {ref}", "ratio", row_names(wl))
        for base in extra_bases(wl):
            # goheap's default (zeroed) rows against the other bases: calloc, or normal mode
            # for (f); zero=False already has its fair reference in the first table.
            names = [
                n
                for n in row_names(wl)
                if n.startswith("goheap") and "zero=False" not in n and n != base
            ]
            out += markdown_cases(wl, f"goheap's ratio to {base}", f"ratio_vs_{base}", names)
    e = results["workloads"].get("e")
    if e and e["rows"]:
        out += [
            "",
            f"**{e['title']}** (MiB)",
            "",
            "| | before | allocated | freed | released | release call |",
            "|---|---|---|---|---|---|",
        ]
        for n, r in e["rows"].items():
            out.append(
                f"| {n} | {r['rss_before'] / H.MiB:.1f} | {r['rss_allocated'] / H.MiB:.1f} | "
                f"{r['rss_freed'] / H.MiB:.1f} | {r['rss_released'] / H.MiB:.1f} | "
                f"{r['release'] or '-'} |"
            )
    return "\n".join(out)


def markdown_cases(wl: dict[str, Any], what: str, key: str, names: list[str]) -> list[str]:
    out = [
        "",
        f"**{wl['title']}**: median, {what}",
        "",
        "| | " + " | ".join(c["case"] for c in wl["cases"]) + " |",
        "|---" * (len(wl["cases"]) + 1) + "|",
    ]
    for n in names:
        cells = [
            f"{H.fmt_ns(c['rows'][n]['median'])} {c['rows'][n][key]:.2f}x"
            if key in c["rows"].get(n, {})
            else "-"
            for c in wl["cases"]
        ]
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    return out
