"""Turn the benchmarks' JSON (pytest-benchmark ``--benchmark-json``) into a table and a plot.

    python tests/bench/report.py [bench-results/bench.json] [--svg bench-results/bench.svg]

Prints: every benchmark's rounds and p50/p95/max (ms, pytest-benchmark's own
timing of the benchmarked call), the restore-to-healthy figures and stage
breakdown from ``vm.timings``, fork + first exec, CPU per small test, the cold
boot / restore ratio, forks/s and PSS. Draws one SVG picture of what a user pays:
every fork's wait (restore-to-healthy, and fork + first exec) and, when the bench
has it, the CPU per small test (standard library only; no plotting dependency).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence
from xml.sax.saxutils import escape

#: vm.timings stages in restore order. spawn/load/resume/guest_ready are
#: cumulative from the fork request; patch is its own duration; guest_resume is
#: measured inside the guest; handoff runs from `cont` to the guest's network ack.
STAGES = (
    "spawn_ms",
    "load_ms",
    "patch_ms",
    "resume_ms",
    "guest_resume_ms",
    "guest_ready_ms",
    "handoff_ms",
    "restore_to_healthy_ms",
)
SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
CPU_COLOURS = ("#17becf", "#bcbd22", "#e377c2")
#: The stages of the ``tcg_blocks`` series, as the bench names them.
TCG_STAGES = ("ready", "first_exec", "second_exec")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.1f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in text)])


def label(bench: dict[str, Any]) -> str:
    return bench.get("name") or bench["fullname"]


def by_kind(benches: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [b for b in benches if b.get("extra_info", {}).get("kind") == kind]


def series_name(bench: dict[str, Any]) -> str:
    info = bench["extra_info"]
    net = "TAP network" if info.get("network") == "tap" else "no network"
    name = f"{net} + mailbox" if info.get("mailbox_payload") else net
    source = info.get("snapshot", "template")
    return name if source == "template" else f"{source}, {name}"


def report(doc: dict[str, Any]) -> str:
    benches = doc.get("benchmarks", [])
    out = []
    machine = doc.get("machine_info", {})
    out.append(
        f"vmfork benchmarks, {doc.get('datetime', '?')} on {machine.get('node', '?')} "
        f"({machine.get('cpu', {}).get('count', '?')} CPUs, python {machine.get('python_version', '?')})"
    )
    out.append("")

    rows = []
    for b in benches:
        s = b["stats"]
        data = [x * 1000 for x in s.get("data") or []]
        p50 = statistics.median(data) if data else s["median"] * 1000
        p95 = percentile(data, 0.95) if data else float("nan")
        mx = max(data) if data else s["max"] * 1000
        rows.append([label(b), s["rounds"], p50, p95, mx])
    out.append("pytest-benchmark timing of each benchmarked call (ms)")
    out.append(table(["benchmark", "rounds", "p50", "p95", "max"], rows))

    restores = by_kind(benches, "restore")
    if restores:
        out += ["", "restore-to-healthy (vm.timings, ms; one fresh fork per round)"]
        rows = []
        for b in restores:
            info = b["extra_info"]
            r = info["restore_to_healthy"]
            rows.append([series_name(b), info["rounds"], r["p50"], r["p95"], r["max"]])
        out.append(table(["fork", "rounds", "p50", "p95", "max"], rows))
        out += [
            "",
            "stage medians (ms; spawn/load/resume/guest_ready cumulative from the fork request,",
            "patch its own duration, guest_resume inside the guest, handoff from cont to the guest's ack)",
        ]
        rows = []
        for b in restores:
            st = b["extra_info"]["stages_median_ms"]
            rows.append([series_name(b), *(float(st.get(k, float("nan"))) for k in STAGES)])
        out.append(table(["fork", *(k.removesuffix("_ms") for k in STAGES)], rows))
        for b in restores:
            labels = b["extra_info"].get("labels", {})
            if labels:
                out.append(f"  {series_name(b)}: " + "; ".join(f"{k} {v}" for k, v in sorted(labels.items())))

    firsts = by_kind(benches, "first_result")
    if firsts:
        out += ["", "fork + first exec: what a test waits for its first result (TAP handoff + one payload, "
                    "then vm.exec(['true']); ms)"]
        rows = []
        for b in firsts:
            info = b["extra_info"]
            f, r, e, st = info["fork_first_exec"], info["restore_to_healthy"], info["first_exec"], info["stages_median_ms"]
            work = "" if info.get("test_work_s") is None else f", tests of {info['test_work_s']:g} s"
            rows.append([f"{info['path']}{work}", info["rounds"], f["p50"], f["p95"], r["p50"], e["p50"],
                         *(float(st.get(f"first_exec.{k}", float("nan")))
                           for k in ("rpc_ms", "spawn_ms", "run_ms")),
                         float(st.get("pool_wait_ms", float("nan"))), f"{info['prewarmed']}/{info['rounds']}"])
        out.append(table(["path", "rounds", "p50", "p95", "restore p50", "exec p50", "rpc",
                          "spawn", "run", "pool wait", "pre-warmed"], rows))
    cpus = by_kind(benches, CPU_KIND)
    if cpus:
        out += ["", "CPU per small test (fork + its commands + close; CPU seconds, QEMU + host)"]
        rows = []
        for b in cpus:
            info = b["extra_info"]
            for key, part in (("cpu_s", "QEMU + host"), ("qemu_cpu_s", "of it QEMU"), ("host_cpu_s", "of it host Python")):
                if info.get(key):
                    v = info[key]
                    rows.append([f"{info.get('label') or 'small test'}, {part}", len(v),
                                 *(f"{x:.2f}" for x in (statistics.median(v), percentile(v, 0.95), max(v)))])
        out.append(table(["series", "tests", "p50 s", "p95 s", "max s"], rows))
    for b in by_kind(benches, "tcg_blocks"):
        cold, warm = b["extra_info"]["cold_fork"], b["extra_info"]["prewarmed_fork"]
        rows = [["cold (library)", cold["ready"], cold["first_exec"], cold["second_exec"]],
                ["pre-warmed (pool)", warm["ready"], warm["first_exec"], warm["second_exec"]]]
        split = b["extra_info"].get("split")  # the cold fork's, by guest PC (tests/bench/tcg_split.py)
        for side in ("kernel", "user") if split else ():
            rows.append([f"cold, {side} code", *(split[stage][side] for stage in TCG_STAGES)])
        out += ["", "TCG translation blocks made per stage (HMP `info jit`; each is guest code run for the "
                    "first time in that QEMU; kernel / user: by the block's guest PC)",
                table(["fork", "to ready", "first exec", "second exec"], rows)]

    for b in by_kind(benches, "two_runs"):
        info = b["extra_info"]
        out += ["", f"two whole runs at once, each -n 2, {info['tests_per_run']} tests each (their own summaries)"]
        for i, r in enumerate(info["runs"]):
            out.append(f"  run {i}: restore-to-healthy p50 {r['restore_p50_ms']:.0f} ms, "
                       f"fork + first exec p50 {r['fork_first_exec_p50_ms']:.0f} ms")

    for b in by_kind(benches, "cold_boot"):
        info = b["extra_info"]
        out += [
            "",
            f"template cold boot ({info['accel']}, {info['memory_mib']} MiB), {info['rounds']} boots: "
            f"boot to agent ready median {info['boot_s_median']:.2f} s "
            f"(each: {', '.join(f'{x:.2f}' for x in info['boot_s'])}); "
            f"whole snapshot build median {info['build_s_median']:.2f} s",
        ]
        ratios = dict(info.get("ratios", {}))
        for rb in restores:  # also computable from this file alone
            which = "restore_tap" if rb["extra_info"]["network"] == "tap" else "restore_none"
            if which not in ratios:
                p50 = rb["extra_info"]["restore_to_healthy"]["p50"]
                ratios[which] = {
                    "restore_p50_ms": p50,
                    "cold_boot_over_restore_p50": round(info["boot_s_median"] * 1000 / p50, 1),
                    "snapshot_build_over_restore_p50": round(info["build_s_median"] * 1000 / p50, 1),
                }
        for which, r in sorted(ratios.items()):
            out.append(
                f"cold boot / fork restore p50 ({which}, p50 {r['restore_p50_ms']:.0f} ms): "
                f"{r['cold_boot_over_restore_p50']:.1f}x  (snapshot build / restore: "
                f"{r['snapshot_build_over_restore_p50']:.1f}x)"
            )

    fps = by_kind(benches, "forks_per_second")
    if fps:
        out += ["", "forks per second (fork + close back to back, in parallel processes like -n 2)"]
        rows = []
        for b in fps:
            info = b["extra_info"]
            r = info["restore_to_healthy"]
            rows.append(
                [
                    f"network={info['network']}",
                    f"{info['processes']} x {info['forks_per_process']}",
                    info["elapsed_s"],
                    info["forks_per_s"],
                    r["p50"],
                    r["p95"],
                    r["max"],
                ]
            )
        out.append(
            table(["forks", "procs x forks", "elapsed s", "forks/s", "restore p50", "p95", "max"], rows)
        )

    transfers = by_kind(benches, "file-transfer")
    if transfers:
        out += ["", "file transfer over the control channel (vm.put / vm.get; MiB/s = file size / round time)"]
        rows = [[b["extra_info"]["direction"], b["extra_info"]["file_mib"], b["extra_info"]["rounds"],
                 b["extra_info"]["mib_per_s_median"], b["extra_info"]["mib_per_s_min"],
                 b["extra_info"]["mib_per_s_max"]] for b in transfers]
        out.append(table(["direction", "file MiB", "rounds", "MiB/s median", "min", "max"], rows))
    for b in by_kind(benches, "layer_snapshot"):
        info = b["extra_info"]
        sn, pause = info["snapshot"], info["pause"]
        out += [
            "",
            f"vm.snapshot() of a {info['memory_mib']} MiB fork that wrote {info['dirty_mib']} MiB, "
            f"{info['rounds']} rounds: p50 {sn['p50']:.0f} ms, p95 {sn['p95']:.0f} ms, max {sn['max']:.0f} ms "
            f"(vCPUs stopped p50 {pause['p50']:.0f} ms); {info['snapshot_mib_median']:.0f} MiB on disk "
            f"(migration stream {info['stream_mib_median']:.0f} MiB)",
        ]

    for b in by_kind(benches, "memory"):
        info = b["extra_info"]
        out += [
            "",
            f"memory per fork (QEMU PSS from /proc/<pid>/smaps_rollup; {info['template_memory_mib']} MiB "
            f"{info.get('snapshot', 'template')}, each fork ready and past one exec; MiB)",
        ]
        rows = []
        for lv in sorted(info["levels"].values(), key=lambda lv: lv["forks"]):
            rows.append(
                [
                    lv["forks"],
                    lv["pss_total_mib"],
                    lv["pss_per_fork_mib"],
                    lv["private_per_fork_mib"],
                    lv["pss_file_per_fork_mib"],
                    lv["pss_anon_per_fork_mib"],
                    lv["rss_per_fork_mib"],
                    lv["other_mappers_of_snapshot"],
                ]
            )
        out.append(
            table(
                [
                    "forks",
                    "PSS total",
                    "PSS/fork",
                    "private/fork",
                    "PSS file/fork",
                    "PSS anon/fork",
                    "RSS/fork",
                    "other QEMUs on snapshot",
                ],
                rows,
            )
        )
        broken = [lv for lv in info["levels"].values() if "classes_per_fork_mib" in lv]
        if broken:
            classes = list(broken[0]["classes_per_fork_mib"])
            out += ["", f"PSS per fork by mapping (tests/bench/forkmem.py; MiB; -accel {info.get('accel', '?')})"]
            out.append(
                table(
                    ["forks", *classes, "TCG code in use", "full-buffer flushes"],
                    [
                        [lv["forks"], *(lv["classes_per_fork_mib"][c]["pss"] for c in classes),
                         float("nan") if lv.get("tcg_code_mib_median") is None else lv["tcg_code_mib_median"],
                         "-" if lv.get("tcg_full_buffer_flushes_max") is None else lv["tcg_full_buffer_flushes_max"]]
                        for lv in sorted(broken, key=lambda lv: lv["forks"])
                    ],
                )
            )

    loads = [b["extra_info"].get("host_before", {}).get("loadavg", [None])[0] for b in benches]
    loads = [x for x in loads if x is not None]
    if loads:
        out += [
            "",
            f"host 1-min load average at the start of each benchmark: {', '.join(f'{x:.1f}' for x in loads)}",
        ]
    return "\n".join(out)


# --- the picture: what a user pays, beside restore-to-healthy --------------------

#: The CPU series the bench writes (tests/bench/test_bench.py): extra_info ``kind``
#: ``cpu_per_small_test`` with ``cpu_s``, one float per small test (CPU seconds of its
#: fork + commands + close, QEMU and host together); optional ``qemu_cpu_s`` and
#: ``host_cpu_s`` (the same tests, split) and ``label``.
CPU_KIND = "cpu_per_small_test"
#: Approximate advance of one character of DejaVu Sans, as a fraction of the font size
#: (its widest lower-case letters are ~0.65 em, digits 0.64): used to lay text out
#: so that nothing runs past the picture's edge.
CHAR_EM = 0.64


def text_width(text: str, size: float) -> float:
    """Upper estimate of the rendered width of ``text`` at font ``size`` (px)."""
    return len(text) * size * CHAR_EM


def wait_series(doc: dict[str, Any]) -> list[tuple[str, list[float]]]:
    """(label, per-round ms) of every series a test waits through: restore-to-healthy
    of each fork kind, then fork + first exec of each path."""
    benches = doc.get("benchmarks", [])
    out = [(f"restore-to-healthy, {series_name(b)}", list(b["extra_info"]["restore_to_healthy_ms"]))
           for b in by_kind(benches, "restore") if b["extra_info"].get("restore_to_healthy_ms")]
    for b in by_kind(benches, "first_result"):
        info = b["extra_info"]
        if info.get("fork_first_exec_ms"):
            work = "" if info.get("test_work_s") is None else f", tests of {info['test_work_s']:g} s"
            out.append((f"fork + first exec, {info['path']}{work}", list(info["fork_first_exec_ms"])))
    return out


def cpu_series(doc: dict[str, Any]) -> list[tuple[str, list[float]]]:
    """(label, per-test CPU seconds) of the ``cpu_per_small_test`` series, if any."""
    out = []
    for b in by_kind(doc.get("benchmarks", []), CPU_KIND):
        info = b["extra_info"]
        name = info.get("label") or "CPU per small test"
        if info.get("cpu_s"):
            out.append((f"{name}, QEMU + host", list(info["cpu_s"])))
        for key, part in (("qemu_cpu_s", "QEMU"), ("host_cpu_s", "host Python")):
            if info.get(key):
                out.append((f"{name}, of it {part}", list(info[key])))
    return out


def figures(values: Sequence[float], unit: str) -> str:
    """The text right of a strip: p50, p95 and the count."""
    return (f"p50 {statistics.median(values):.3g} {unit}  p95 {percentile(values, 0.95):.3g} {unit}"
            f"  (n={len(values)})")


def nice_top(value: float) -> float:
    """The smallest round axis end at or above ``value``: m x 10^k with m one of
    1, 1.2, 1.6, 2, 2.4, 3, 4, 5, 6, 8, so its quarters are round too."""
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for m in (1, 1.2, 1.6, 2, 2.4, 3, 4, 5, 6, 8, 10):
        if value <= m * exp:
            return m * exp
    return 10 * exp


def _panel(svg: list[str], rows: list[tuple[str, list[float]]], *, top: float, left: float, plot_w: float,
           unit: str, axis: str, title: str, colour_of: Any) -> float:
    """One strip plot: a row per series (every sample a dot, p50 a bar, p5-p95 a line),
    its label left of the plot and its figures right of it. Returns the y below it."""
    row_h, size = 26, 12
    svg.append(f'<text x="{left}" y="{top + 14}" font-size="13" font-weight="bold">{escape(title)}</text>')
    top += 26
    hi = nice_top(max(max(v) for _, v in rows))

    def x_of(v: float) -> float:
        return left + min(v / hi, 1.0) * plot_w

    bottom = top + row_h * len(rows)
    for i in range(5):  # grid and axis labels
        x = left + plot_w * i / 4
        svg.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#e5e5e5"/>')
        svg.append(f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle" fill="#333">'
                   f"{hi * i / 4:g}</text>")
    svg.append(f'<text x="{left + plot_w / 2:.1f}" y="{bottom + 32}" text-anchor="middle">{escape(axis)}</text>')
    for r, (name, values) in enumerate(rows):
        y = top + row_h * r + row_h / 2
        colour = colour_of(r)
        p50, lo, p95 = statistics.median(values), percentile(values, 0.05), percentile(values, 0.95)
        svg.append(f'<text x="{left - 10}" y="{y + 4:.1f}" text-anchor="end" font-size="{size}">'
                   f"{escape(name)}</text>")
        svg.append(f'<line x1="{x_of(lo):.1f}" y1="{y:.1f}" x2="{x_of(p95):.1f}" y2="{y:.1f}" '
                   f'stroke="{colour}" stroke-width="2"/>')
        for k, v in enumerate(values):  # a fixed vertical spread, so equal values stay visible
            dy = ((k * 7) % 11 - 5) * 0.9
            svg.append(f'<circle cx="{x_of(v):.1f}" cy="{y + dy:.1f}" r="2.6" fill="{colour}" '
                       f'fill-opacity="0.45"/>')
        svg.append(f'<rect x="{x_of(p50) - 1.5:.1f}" y="{y - 9:.1f}" width="3" height="18" fill="{colour}">'
                   f"<title>{escape(name)}: p50 {p50:.4g} {unit}</title></rect>")
        svg.append(f'<text x="{left + plot_w + 10}" y="{y + 4:.1f}" font-size="{size}" fill="{colour}">'
                   f"{escape(figures(values, unit))}</text>")
    svg.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#333"/>')
    return bottom + 44


def picture_svg(doc: dict[str, Any]) -> str:
    """What a user pays per test, beside restore-to-healthy: a strip plot of every
    wait series (ms) and, when the bench has it, of the CPU per small test (s). Every
    label sits in a margin sized from its text, so nothing is cut off at an edge."""
    waits, cpus = wait_series(doc), cpu_series(doc)
    if not waits and not cpus:
        raise ValueError("the bench JSON has no restore, first_result or cpu_per_small_test series to draw")
    labels = [name for name, _ in waits + cpus]
    left = 24 + max(text_width(n, 12) for n in labels)
    right = 24 + max([text_width(figures(v, "ms"), 12) for _, v in waits]
                     + [text_width(figures(v, "s"), 12) for _, v in cpus])
    plot_w = 420.0
    width = left + plot_w + right
    machine = doc.get("machine_info", {})
    title = "pytest-vmfork: what a test waits for, and what it costs"
    subtitle = (f"{doc.get('datetime', '')[:19]}  {machine.get('node', '')}, "
                f"{machine.get('cpu', {}).get('count', '?')} CPUs; every dot one fork; bar p50, line p5-p95")
    width = max(width, 24 + text_width(title, 16), 24 + text_width(subtitle, 12))
    svg: list[str] = []
    y = 70.0
    if waits:
        y = _panel(svg, waits, top=y, left=left, plot_w=plot_w, unit="ms", axis="ms from the fork request",
                   title="wait per test: restore-to-healthy, and fork + first command",
                   colour_of=lambda r: SERIES_COLOURS[r % len(SERIES_COLOURS)])
    if cpus:
        y = _panel(svg, cpus, top=y, left=left, plot_w=plot_w, unit="s", axis="CPU seconds per test",
                   title="CPU per small test (fork + its commands + close)",
                   colour_of=lambda r: CPU_COLOURS[r % len(CPU_COLOURS)])
    else:
        svg.append(f'<text x="{left}" y="{y + 8:.1f}" fill="#777">no {CPU_KIND} series in this bench JSON</text>')
        y += 24
    height = y
    head = [
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
         f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">'),
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>',
        (f'<text x="{width / 2:.1f}" y="26" text-anchor="middle" font-size="16" font-weight="bold">'
         f"{escape(title)}</text>"),
        f'<text x="{width / 2:.1f}" y="46" text-anchor="middle" fill="#555">{escape(subtitle)}</text>',
    ]
    return "\n".join([*head, *svg, "</svg>"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="?", default="bench-results/bench.json", type=Path)
    parser.add_argument(
        "--svg",
        default=None,
        type=Path,
        help="the picture: wait per test and CPU per small test (default: bench.svg next to the JSON)",
    )
    args = parser.parse_args(argv)
    try:
        doc = json.loads(args.json.read_text())
    except (OSError, ValueError) as exc:
        print(f"report: cannot read {args.json}: {exc}; run `make bench` first", file=sys.stderr)
        return 2
    print(report(doc))
    try:
        picture = picture_svg(doc)
    except ValueError as exc:
        print(f"\nno picture: {exc}")
        return 0
    svg_path = args.svg or args.json.with_name("bench.svg")
    svg_path.write_text(picture)
    print(f"\npicture: {svg_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
