"""python -m goheap: every subcommand runs on a real heap (cli.py, heapmap.py, demo.py).

The command-line contract is tested on real processes: every mistake exits 2
(usage) or 1 (one ``goheap: error:`` line) without a traceback."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import pathlib
import struct
import subprocess
import sys

import pytest

import goheap
from goheap import cli, heapmap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv):
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def goheap_cli(*argv, timeout=120):
    """``python -m goheap argv`` in a child process: the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "goheap", *argv], capture_output=True, text=True, timeout=timeout
    )


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_cli_stats_table_and_json_agree(capsys):
    args = ("stats", "--objects", "2000", "--arena-mib", "1024")
    table = run(capsys, *args)
    st = json.loads(run(capsys, *args, "--json"))
    assert st["mallocs"] == 2000 and st["frees"] == 2000 // 3
    assert st["heap_sys"] == st["heap_inuse"] + st["heap_idle"]
    assert f"{'heap_alloc':<16} {st['heap_alloc']:>14}" in table
    assert len(st["by_size"]) == goheap.NUM_SIZE_CLASSES


def test_cli_stats_scavenge_releases(capsys):
    st = json.loads(run(capsys, "stats", "--objects", "500", "--large-pct", "50",
                        "--arena-mib", "1024", "--scavenge", "--json"))  # fmt: skip
    assert st["heap_released"] > 0 and st["heap_released"] <= st["heap_idle"]


def test_cli_classes_matches_the_table(capsys):
    out = run(capsys, "classes")
    rows = json.loads(run(capsys, "classes", "--json"))
    assert len(rows) == goheap.NUM_SIZE_CLASSES - 1
    assert rows[0]["size"] == 8 and rows[-1]["size"] == goheap.MAX_SMALL_SIZE
    assert "max waste %" in out and len(out.splitlines()) == len(rows) + 4


def test_cli_map_text_shows_spans(capsys):
    out = run(capsys, "map", "--objects", "1000", "--large-pct", "5", "--arena-mib", "1024")
    grid = "".join(line.split("|")[1] for line in out.splitlines() if line.count("|") == 2)
    assert heapmap.LARGE in grid and any(c in heapmap.DIGITS for c in grid)
    assert "small" in out and "objects live" in out


def test_cli_map_text_shows_efence_faults(capsys):
    out = run(capsys, "map", "--efence", "--objects", "60", "--large-pct", "0",
              "--arena-mib", "256")  # fmt: skip
    assert heapmap.FAULTED in out.split("legend")[0] and "faulted" in out


def test_cli_map_png_differs_between_empty_and_used_heap(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    empty, used = tmp_path / "empty.png", tmp_path / "used.png"
    run(capsys, "map", "--empty", "--arena-mib", "256", "--png", str(empty))
    run(capsys, "map", "--objects", "3000", "--arena-mib", "256", "--scavenge", "--png", str(used))
    for p in (empty, used):
        assert p.read_bytes()[:8] == PNG_MAGIC
    a, b = imread(empty), imread(used)
    assert a.shape == b.shape and a.ndim == 3
    assert (abs(a - b) > 0.1).any(axis=-1).mean() > 0.01  # more than 1% of the pixels changed


def test_cli_demo_runs_the_tour():
    out = subprocess.run(
        [sys.executable, "-m", "goheap", "demo"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for title in ("The OS layer", "mallocinit", "Small and large", "scavenge", "32-bit", "efence"):
        assert title in out.stdout
    assert "arena_start % 8192 = 0" in out.stdout


def test_cli_progress_passes_items_through():
    assert list(cli.progress(range(30_000), 30_000, "x")) == list(range(30_000))


# ---- mistakes: usage errors exit 2, runtime errors exit 1, never a traceback ------------

USAGE_MISTAKES = {
    "ArenaMibZero": ("stats", "--arena-mib", "0"),
    "ArenaMibNotInt": ("stats", "--arena-mib", "1.5"),
    "MapWidthZero": ("map", "--width", "0"),
    "PngWidthZero": ("map", "--png-width", "0"),
    "MaxCellsZero": ("map", "--max-cells", "0"),
    "ObjectsNegative": ("stats", "--objects", "-5"),
    "MapObjectsNegative": ("map", "--objects", "-5"),
    "ObjectsNotInt": ("stats", "--objects", "many"),
    "LargePct200": ("stats", "--large-pct", "200"),
    "LargePctNegative": ("map", "--large-pct", "-1"),
    "LargePctNan": ("stats", "--large-pct", "nan"),
    "FreeEveryNegative": ("stats", "--free-every", "-1"),
    "SeedNotInt": ("stats", "--seed", "x"),
    "BadMode": ("stats", "--mode", "16bit"),
    "Arena32TooBig": ("map", "--mode", "32bit", "--arena-mib", "4096"),
    "NoCommand": (),
    "UnknownCommand": ("frobnicate",),
}


@pytest.mark.parametrize("argv", USAGE_MISTAKES.values(), ids=USAGE_MISTAKES.keys())
def test_cli_usage_mistake_exits_2_with_usage(argv):
    r = goheap_cli(*argv)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("usage: ") and ": error: " in r.stderr
    assert r.stdout == ""
    if len(argv) >= 3:
        assert f"argument {argv[-2]}:" in r.stderr  # names the option it refuses


def test_cli_usage_mistake_names_the_limit():
    assert "must be at least 1, not 0" in goheap_cli("map", "--width", "0").stderr
    assert "from 0 to 100, not 200" in goheap_cli("stats", "--large-pct", "200").stderr
    r = goheap_cli("stats", "--mode", "32bit", "--arena-mib", "2049")
    assert f"at most {goheap.MAX_ARENA32 >> 20} MiB, not 2049" in r.stderr


def test_cli_option_bounds_are_accepted():
    r = goheap_cli("stats", "--objects", "0", "--free-every", "0", "--large-pct", "100",
                   "--arena-mib", "64", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["mallocs"] == 0 and st["heap_objects"] == 0


def test_cli_mode_32bit_runs_with_its_own_default_arena():
    r = goheap_cli("map", "--mode", "32bit", "--objects", "200")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout.startswith("arena [")


def assert_one_error_line(r):
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("goheap: error: "), r.stderr
    return lines[0]


def test_cli_map_png_into_missing_folder_is_one_error_line(tmp_path):
    pytest.importorskip("matplotlib")  # without it, that is the one error line
    target = tmp_path / "nonexistent" / "x.png"
    line = assert_one_error_line(goheap_cli("map", "--arena-mib", "64", "--png", str(target)))
    assert str(target) in line and not target.parent.exists()
    line = assert_one_error_line(
        goheap_cli("map", "--arena-mib", "64", "--png", "/nonexistent/x.png")
    )
    assert "/nonexistent" in line


def test_cli_map_png_onto_a_folder_is_one_error_line(tmp_path):
    pytest.importorskip("matplotlib")
    line = assert_one_error_line(goheap_cli("map", "--arena-mib", "64", "--png", str(tmp_path)))
    assert "directory" in line


def test_cli_map_png_without_matplotlib_is_one_error_line(tmp_path):
    # matplotlib made unimportable in the child, as when the plot extra is not installed.
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from goheap.cli import main\n"
        f"sys.exit(main(['map', '--arena-mib', '64', '--png', {str(tmp_path / 'x.png')!r}]))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    line = assert_one_error_line(r)
    assert "matplotlib" in line and "goheap[plot]" in line
    assert not (tmp_path / "x.png").exists()


def test_cli_arena_too_small_is_one_error_line():
    line = assert_one_error_line(goheap_cli("stats", "--arena-mib", "1"))
    assert "out of memory" in line


# ---- the program itself: --version, its name, defaults, a closed pipe -----------------------


def test_cli_version_is_the_installed_version():
    try:
        installed = importlib.metadata.version("goheap")
    except importlib.metadata.PackageNotFoundError:
        installed = goheap.__version__  # built in place, not installed (make sanitize, the lanes)
    r = goheap_cli("--version")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.strip() == f"goheap {installed}"
    assert cli.version() == goheap.__version__ == installed


def test_cli_prog_is_python_m_goheap_under_m():
    r = goheap_cli("stats", "--objects", "-1")
    assert r.stderr.startswith(f"usage: {os.path.basename(sys.executable)} -m goheap stats ")


def test_cli_prog_is_goheap_for_the_console_script():
    script = pathlib.Path(sys.executable).parent / "goheap"
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable} (goheap not pip-installed)")
    r = subprocess.run([str(script), "map", "--width", "0"], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("usage: goheap map ")
    assert "goheap map: error: argument --width" in r.stderr
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == f"goheap {goheap.__version__}"


def test_cli_help_shows_defaults():
    out = goheap_cli("map", "--help").stdout
    flat = " ".join(out.split())
    for default in ("(default: 5000)", "(default: 3)", "(default: 2.0)", "(default: 4096;",
                    "(default: 64bit)", "(default: 64)", "(default: 128)", "(default: 2048)"):  # fmt: skip
        assert default in flat


def test_cli_closed_stdout_ends_quietly():
    # The reading end is closed before the child writes: its first write fails
    # with EPIPE, every time.
    p = subprocess.Popen(
        [sys.executable, "-m", "goheap", "classes"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.close()
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.wait(timeout=60) == 1
    assert err == ""


def test_cli_pipe_into_head_ends_quietly():
    # Over 64 KiB of map lines, so head's exit closes the pipe mid-output.
    argv = "map --objects 1500 --large-pct 50 --arena-mib 1024 --max-cells 100000 --width 1"
    r = subprocess.run(
        f"'{sys.executable}' -m goheap {argv} | head -1; echo \"rc=${{PIPESTATUS[0]}}\" >&2",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.stdout.startswith("arena [") and len(r.stdout.splitlines()) == 1
    assert r.stderr.strip() in ("rc=0", "rc=1"), r.stderr


# ---- map: text or PNG; what each cell shows ---------------------------------------------------


def test_cli_map_prints_text_without_png():
    r = goheap_cli("map", "--objects", "500", "--arena-mib", "256", "--width", "32")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.count("|") == 2]
    assert rows and all(len(line.split("|")[1]) <= 32 for line in rows)
    assert "wrote" not in r.stdout


def test_cli_map_png_writes_the_file_and_one_line(tmp_path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "map.png"
    r = goheap_cli("map", "--objects", "800", "--large-pct", "5", "--arena-mib", "256",
                   "--png", str(target))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [r.stdout.strip()] and r.stdout.startswith(f"wrote {target}:")
    assert "|" not in r.stdout  # no text map besides the PNG
    assert png_size(target) == (1000, 600)  # 10 x 6 inches at 100 dpi, whatever the heap
    assert target.stat().st_size > 10_000


def efence_cells(char: str) -> list[str]:
    """One efence object's cells in the text map: its span is an OS page (8 KiB
    cells), so at 16 and 64 KiB pages it is drawn over several, the first a START."""
    cells = max(1, os.sysconf("SC_PAGE_SIZE") // goheap.PAGE_SIZE)
    return [char] if cells == 1 else [heapmap.START] + [char] * (cells - 1)


def test_heapmap_efence_objects_are_efence_not_large():
    with goheap.Heap(arena_size=256 << 20, efence=True) as h:
        vs = [h.malloc(64) for _ in range(6)]
        h.free(vs[0])
        m = heapmap.ArenaMap(h)
        kinds = {m.kind(s) for s in m.spans}
        assert "large" not in kinds and {"efence", "faulted"} <= kinds
        grid = m.chars()
        want = efence_cells(heapmap.FAULTED) + efence_cells(heapmap.EFENCE) * 5
        assert grid[: len(want)] == want
        summary = "\n".join(m.summary())
        assert "efence" in summary and "5/5 objects live" in summary and "large" not in summary


def test_cli_map_efence_counts_efence_objects(capsys):
    out = run(
        capsys, "map", "--efence", "--objects", "60", "--large-pct", "0", "--arena-mib", "256"
    )
    summary = {line.split()[0]: line for line in out.splitlines() if " spans " in line}
    assert set(summary) == {"efence", "free", "faulted"}  # no "large", no "small"
    assert "40 spans" in summary["efence"] and "40/40 objects live" in summary["efence"]
    grid = "".join(line.split("|")[1] for line in out.splitlines() if line.count("|") == 2)
    assert heapmap.LARGE not in grid
    assert grid.count(heapmap.EFENCE) == 40 * efence_cells(heapmap.EFENCE).count(heapmap.EFENCE)


def test_heapmap_neighbouring_large_objects_show_a_border():
    with goheap.Heap(arena_size=256 << 20) as h:
        a, b, c = (h.malloc(5 << goheap.PAGE_SHIFT) for _ in range(3))
        assert b == a + (5 << goheap.PAGE_SHIFT) and c == b + (5 << goheap.PAGE_SHIFT)
        m = heapmap.ArenaMap(h)
        assert "".join(m.chars()[:16]) == "[####[####[####."
    pytest.importorskip("matplotlib")
    kind, _occ = m.rgba(width=32)
    row = [tuple(x) for x in kind[0, :15, :3]]
    assert row[0] == row[4] != row[5] == row[9] != row[10] == row[14] == row[0]


def test_heapmap_empty_heap_is_an_empty_arena_not_black():
    pytest.importorskip("matplotlib")
    with goheap.Heap(arena_size=64 << 20) as h:
        m = heapmap.ArenaMap(h)
        assert m.ncells == 0 and "nothing mapped yet" in m.text()
        kind, occ = m.rgba(width=16)
        assert kind.shape == (1, 16, 4)
        assert (kind[..., :3] == heapmap.RGB_UNMAPPED).all() and (occ == kind).all()


def test_cli_map_empty_png_is_not_black(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    target = tmp_path / "empty.png"
    r = goheap_cli("map", "--empty", "--arena-mib", "64", "--png", str(target))
    assert r.returncode == 0, r.stderr
    img = imread(target)[..., :3]
    assert (img < 0.05).all(axis=-1).mean() < 0.02  # under 2% black pixels: text and frames


def test_heapmap_png_axes_label_addresses():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with goheap.Heap(arena_size=256 << 20) as h:
        h.malloc(100)
        m = heapmap.ArenaMap(h)
    fig, ax = plt.subplots()
    try:
        kind, _ = m.rgba(width=32)
        ax.imshow(kind)
        m._address_axes(ax, kind.shape[0], 32)
        ys = [t.get_text() for t in ax.get_yticklabels()]
        xs = [t.get_text() for t in ax.get_xticklabels()]
    finally:
        plt.close(fig)
    assert ys[0] == f"{m.arena_start:#x}" and ys[1] == f"{m.arena_start + 32 * m.cell_bytes:#x}"
    assert xs[0] == "+0 B" and xs[-1] == f"+{heapmap.format_bytes(32 * m.cell_bytes)}"


# ---- stats: only the fields goheap fills ---------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [(), ("--efence",), ("--scavenge", "--large-pct", "30"), ("--mode", "32bit")],
    ids=["Default", "Efence", "Scavenge", "Mode32bit"],
)
def test_cli_stats_always_zero_fields_are_zero_and_named_once(capsys, extra):
    args = ("stats", "--objects", "1500", "--arena-mib", "512", *extra)
    st = json.loads(run(capsys, *args, "--json"))
    assert set(cli.ALWAYS_ZERO) <= set(st)  # still Go's MemStats names in JSON
    assert all(st[name] == 0 for name in cli.ALWAYS_ZERO)
    table = run(capsys, *args)
    rows = {line.split()[0] for line in table.split("\n\n")[0].splitlines()}
    assert not rows & set(cli.ALWAYS_ZERO)
    assert "always 0 in goheap" in table
    for name in cli.ALWAYS_ZERO:
        assert table.count(name) == 1


def test_cli_stats_table_shows_every_filled_field(capsys):
    table = run(capsys, "stats", "--objects", "1000", "--arena-mib", "512")
    rows = {line.split()[0] for line in table.split("\n\n")[0].splitlines()}
    fields = {f.name for f in dataclasses.fields(goheap.MStats)} - {"by_size"}
    assert rows == fields - set(cli.ALWAYS_ZERO)
