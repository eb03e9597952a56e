"""Turn the benchmarks' JSON (pytest-benchmark ``--benchmark-json``) into a table and a plot.

    python tests/bench/report.py [bench-results/bench.json] [--svg bench-results/restore.svg]

Prints: every benchmark's rounds and p50/p95/max (ms, pytest-benchmark's own
timing of the benchmarked call), the restore-to-healthy figures and stage
breakdown from ``vm.timings``, the cold boot / restore ratio, forks/s and PSS.
Writes an SVG histogram of the per-round restore-to-healthy times (standard
library only; no plotting dependency).
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
SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")


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
                           for k in ("session_wait_ms", "rpc_ms", "spawn_ms", "run_ms")),
                         float(st.get("pool_wait_ms", float("nan"))), f"{info['prewarmed']}/{info['rounds']}"])
        out.append(table(["path", "rounds", "p50", "p95", "restore p50", "exec p50", "session wait", "rpc",
                          "spawn", "run", "pool wait", "pre-warmed"], rows))
    for b in by_kind(benches, "tcg_blocks"):
        cold, warm = b["extra_info"]["cold_fork"], b["extra_info"]["prewarmed_fork"]
        out += ["", "TCG translation blocks made per stage (HMP `info jit`; each is guest code run for the "
                    "first time in that QEMU)",
                table(["fork", "to ready", "first exec", "second exec"],
                      [["cold (library)", cold["ready"], cold["first_exec"], cold["second_exec"]],
                       ["pre-warmed (pool)", warm["ready"], warm["first_exec"], warm["second_exec"]]])]

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


# --- SVG histogram -------------------------------------------------------------


def nice_step(span: float, target_bins: int = 24) -> float:
    raw = max(span / target_bins, 1e-9)
    exp = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * exp:
            return m * exp
    return 10 * exp


def histogram_svg(series: list[tuple[str, list[float]]], title: str, subtitle: str = "") -> str:
    width, height = 860, 460
    left, right, top, bottom = 70, 30, 86, 60
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for _, vals in series for v in vals]
    lo, hi = min(values), max(values)
    step = nice_step(hi - lo if hi > lo else 1.0)
    start = math.floor(lo / step) * step
    nbins = max(1, int(math.floor((hi - start) / step)) + 1)
    counts = []
    for _, vals in series:
        c = [0] * nbins
        for v in vals:
            c[min(nbins - 1, int((v - start) // step))] += 1
        counts.append(c)
    ymax = max(max(c) for c in counts)
    yticks = max(1, math.ceil(ymax / 6))
    ytop = math.ceil((ymax + 0.5) / yticks) * yticks  # headroom above the tallest bar
    x_of = lambda v: left + (v - start) / (nbins * step) * plot_w  # noqa: E731
    y_of = lambda n: top + plot_h - n / ytop * plot_h  # noqa: E731

    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="16" font-weight="bold">'
        f"{escape(title)}</text>",
    ]
    if subtitle:
        svg.append(f'<text x="{width / 2}" y="44" text-anchor="middle" fill="#555">{escape(subtitle)}</text>')
    for i in range(0, ytop + 1, yticks):  # y grid and labels
        y = y_of(i)
        svg.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        svg.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{i}</text>')
    label_every = max(1, math.ceil(nbins / 12))
    for i in range(nbins + 1):  # x ticks at bin edges
        x = x_of(start + i * step)
        svg.append(
            f'<line x1="{x:.1f}" y1="{top + plot_h}" x2="{x:.1f}" y2="{top + plot_h + 5}" stroke="#333"/>'
        )
        if i % label_every == 0:
            svg.append(
                f'<text x="{x:.1f}" y="{top + plot_h + 20}" text-anchor="middle">{start + i * step:g}</text>'
            )
    bin_w = plot_w / nbins
    bar_w = bin_w * 0.9 / len(series)
    for s, c in enumerate(counts):
        colour = SERIES_COLOURS[s % len(SERIES_COLOURS)]
        for i, n in enumerate(c):
            if n:
                x = left + i * bin_w + bin_w * 0.05 + s * bar_w
                svg.append(
                    f'<rect x="{x:.1f}" y="{y_of(n):.1f}" width="{bar_w:.1f}" '
                    f'height="{top + plot_h - y_of(n):.1f}" '
                    f'fill="{colour}" fill-opacity="0.85"><title>{escape(series[s][0])}: {n} forks in '
                    f"[{start + i * step:g}, {start + (i + 1) * step:g}) ms</title></rect>"
                )
    # p50 markers; the lowest p50's label sits left of its line, the others right, so they never cross
    order = sorted(range(len(series)), key=lambda i: statistics.median(series[i][1]))
    for rank, s in enumerate(order):
        colour = SERIES_COLOURS[s % len(SERIES_COLOURS)]
        p50 = statistics.median(series[s][1])
        x = x_of(p50)
        svg.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="{colour}" '
            f'stroke-width="2" stroke-dasharray="6,4"/>'
        )
        tx, anchor = (x - 4, "end") if rank == 0 and len(series) > 1 else (x + 4, "start")
        svg.append(
            f'<text x="{tx:.1f}" y="{top + 14 + 16 * max(0, rank - 1)}" text-anchor="{anchor}" '
            f'fill="{colour}" stroke="white" stroke-width="3" paint-order="stroke">p50 {p50:.0f} ms</text>'
        )
    svg.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>'
    )
    svg.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>')
    svg.append(
        f'<text x="{left + plot_w / 2}" y="{height - 18}" text-anchor="middle">'
        f"restore-to-healthy per fork (ms), bins of {step:g} ms</text>"
    )
    svg.append(
        f'<text x="18" y="{top + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 18 {top + plot_h / 2})">forks (rounds)</text>'
    )
    lx, ly = left, top - 22  # legend: one row between the title and the plot
    for s, (name, vals) in enumerate(series):
        colour = SERIES_COLOURS[s % len(SERIES_COLOURS)]
        text = f"{name} (n={len(vals)}, p95 {percentile(vals, 0.95):.0f} ms, max {max(vals):.0f} ms)"
        svg.append(f'<rect x="{lx}" y="{ly - 10}" width="14" height="12" fill="{colour}"/>')
        svg.append(f'<text x="{lx + 20}" y="{ly}">{escape(text)}</text>')
        lx += 20 + 7 * len(text) + 24
    svg.append("</svg>")
    return "\n".join(svg) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="?", default="bench-results/bench.json", type=Path)
    parser.add_argument(
        "--svg",
        default=None,
        type=Path,
        help="histogram of restore-to-healthy (default: restore.svg next to the JSON)",
    )
    args = parser.parse_args(argv)
    try:
        doc = json.loads(args.json.read_text())
    except (OSError, ValueError) as exc:
        print(f"report: cannot read {args.json}: {exc}; run `make bench` first", file=sys.stderr)
        return 2
    print(report(doc))
    series = [
        (series_name(b), b["extra_info"]["restore_to_healthy_ms"])
        for b in by_kind(doc.get("benchmarks", []), "restore")
        if b["extra_info"].get("restore_to_healthy_ms")
    ]
    if series:
        svg_path = args.svg or args.json.with_name("restore.svg")
        machine = doc.get("machine_info", {})
        subtitle = (
            f"{doc.get('datetime', '')[:19]}  {machine.get('node', '')}, "
            f"{machine.get('cpu', {}).get('count', '?')} CPUs; one fresh fork per round"
        )
        svg_path.write_text(histogram_svg(series, "pytest-vmfork: fork restore-to-healthy", subtitle))
        print(f"\nhistogram: {svg_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
