"""python -m goheap: every subcommand runs on a real heap (cli.py, heapmap.py, demo.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import goheap
from goheap import cli, heapmap


def run(capsys, *argv):
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


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
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
