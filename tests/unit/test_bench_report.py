"""tests/bench/report.py: the table and the picture of `make bench`, from a small
bench JSON shaped like the one tests/bench/test_bench.py writes."""

from __future__ import annotations

import json
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.bench import report

SVG = "{http://www.w3.org/2000/svg}"


def bench(kind: str, name: str, **info: Any) -> dict[str, Any]:
    return {"name": name, "fullname": f"tests/bench/test_bench.py::{name}", "extra_info": {"kind": kind, **info},
            "stats": {"rounds": 12, "median": 0.4, "max": 0.6, "data": [0.4] * 12}}


def doc(*, with_cpu: bool) -> dict[str, Any]:
    rnd = random.Random(21)

    def ms(mid: float) -> list[float]:
        return [round(rnd.uniform(0.8, 1.3) * mid, 1) for _ in range(12)]

    benches = [
        bench("restore", "test_restore_to_healthy_tap_and_mailbox", snapshot="template", network="tap",
              mailbox_payload=True, rounds=12, restore_to_healthy_ms=ms(240),
              restore_to_healthy={"p50": 240, "p95": 300, "max": 310}, stages_median_ms={}, labels={}),
        bench("restore", "test_restore_to_healthy_layer_tap_and_mailbox", snapshot="layer (depth 1)",
              network="tap", mailbox_payload=True, rounds=12, restore_to_healthy_ms=ms(460),
              restore_to_healthy={"p50": 460, "p95": 600, "max": 610}, stages_median_ms={}, labels={}),
        bench("first_result", "test_fork_and_first_exec_library", path="library, pool off", test_work_s=None,
              rounds=12, fork_first_exec_ms=ms(557), fork_first_exec={"p50": 557, "p95": 700},
              restore_to_healthy={"p50": 237}, first_exec={"p50": 290}, prewarmed=0, stages_median_ms={}),
        bench("first_result", "test_fork_and_first_exec_plugin_pool[1.0]", path="plugin, warm pool",
              test_work_s=1.0, rounds=12, fork_first_exec_ms=ms(120), fork_first_exec={"p50": 120, "p95": 142},
              restore_to_healthy={"p50": 36}, first_exec={"p50": 81}, prewarmed=12, stages_median_ms={}),
    ]
    if with_cpu:
        qemu = [round(rnd.uniform(0.6, 0.8), 3) for _ in range(40)]
        host = [round(rnd.uniform(0.015, 0.025), 3) for _ in range(40)]
        benches.append(bench("cpu_per_small_test", "test_cpu_per_small_test", label="small test, 4 commands",
                             cpu_s=[q + h for q, h in zip(qemu, host, strict=True)], qemu_cpu_s=qemu,
                             host_cpu_s=host))
    return {"datetime": "2026-12-04T15:50:00", "machine_info": {"node": "bench-host", "cpu": {"count": 2}},
            "benchmarks": benches}


def texts(svg: str) -> list[ET.Element]:
    return list(ET.fromstring(svg).iter(f"{SVG}text"))


def extent(el: ET.Element) -> tuple[float, float]:
    """Leftmost and rightmost x a text element may cover (report.text_width's estimate)."""
    x, size = float(el.get("x", 0)), float(el.get("font-size", 12))
    width = report.text_width(el.text or "", size)
    anchor = el.get("text-anchor", "start")
    left = x - width if anchor == "end" else x - width / 2 if anchor == "middle" else x
    return left, left + width


@pytest.mark.parametrize("with_cpu", [True, False])
def test_every_text_of_the_picture_lies_inside_it(with_cpu: bool) -> None:
    svg = report.picture_svg(doc(with_cpu=with_cpu))
    root = ET.fromstring(svg)
    width, height = float(root.get("width")), float(root.get("height"))
    assert root.get("viewBox") == f"0 0 {width:.0f} {height:.0f}"
    for el in texts(svg):
        left, right = extent(el)
        assert 0 <= left and right <= width, (el.text, left, right, width)
        assert 0 < float(el.get("y")) <= height, el.text


def test_the_picture_shows_what_a_user_pays_beside_restore_to_healthy() -> None:
    svg = report.picture_svg(doc(with_cpu=True))
    labels = [el.text for el in texts(svg)]
    assert "restore-to-healthy, TAP network + mailbox" in labels
    assert "restore-to-healthy, layer (depth 1), TAP network + mailbox" in labels
    assert "fork + first exec, library, pool off" in labels
    assert "fork + first exec, plugin, warm pool, tests of 1 s" in labels
    assert {"small test, 4 commands, QEMU + host", "small test, 4 commands, of it QEMU",
            "small test, 4 commands, of it host Python"} <= set(labels)
    # every sample is a dot: 4 wait series of 12 rounds, 3 CPU series of 40 tests
    assert len(list(ET.fromstring(svg).iter(f"{SVG}circle"))) == 4 * 12 + 3 * 40


def test_without_a_cpu_series_the_picture_says_so() -> None:
    svg = report.picture_svg(doc(with_cpu=False))
    assert "no cpu_per_small_test series in this bench JSON" in [el.text for el in texts(svg)]


def test_a_bench_without_any_series_to_draw_is_refused() -> None:
    with pytest.raises(ValueError, match="no restore, first_result or cpu_per_small_test series"):
        report.picture_svg({"benchmarks": [bench("memory", "test_memory_per_fork", levels={})]})


def test_the_table_gives_the_cpu_per_small_test_in_seconds() -> None:
    text = report.report(doc(with_cpu=True))
    row = next(line for line in text.splitlines() if line.startswith("small test, 4 commands, of it QEMU"))
    assert re.fullmatch(r"small test, 4 commands, of it QEMU\s+40\s+0\.\d\d\s+0\.\d\d\s+0\.\d\d", row), row


def test_the_tcg_table_splits_the_cold_fork_into_kernel_and_user_blocks() -> None:
    blocks = bench("tcg_blocks", "test_translated_blocks_per_stage",
                   cold_fork={"ready": 10400, "first_exec": 20800, "second_exec": 2690},
                   prewarmed_fork={"ready": 30000, "first_exec": 900, "second_exec": 40},
                   split={"ready": {"kernel": 9000, "user": 1390}, "first_exec": {"kernel": 8000, "user": 12790},
                          "second_exec": {"kernel": 90, "user": 2600}})
    lines = report.report({"benchmarks": [blocks]}).splitlines()
    assert [line.split() for line in lines if line.startswith("cold, ")] == [
        ["cold,", "kernel", "code", "9000", "8000", "90"], ["cold,", "user", "code", "1390", "12790", "2600"]]
    older = dict(blocks, extra_info={k: v for k, v in blocks["extra_info"].items() if k != "split"})
    assert not any(line.startswith("cold, ") for line in report.report({"benchmarks": [older]}).splitlines())


def test_the_command_line_writes_the_picture_next_to_the_json(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bench.json").write_text(json.dumps(doc(with_cpu=True)))
    assert report.main([str(tmp_path / "bench.json")]) == 0
    assert ET.parse(tmp_path / "bench.svg").getroot().tag == f"{SVG}svg"
    assert f"picture: {tmp_path / 'bench.svg'}" in capsys.readouterr().out
