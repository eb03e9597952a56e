"""Where a fork's QEMU memory goes: /proc/<pid>/smaps grouped by what each mapping is.

``smaps_rollup`` gives one PSS figure; to know which knob could shrink it, the
mappings are classed (order matters, the first rule that matches wins):

- ``guest_ram_private``: the pages of the snapshot's RAM file this fork wrote
  (copy-on-write copies: the guest's own work since the fork);
- ``guest_ram_shared``: its share of the RAM file's page-cache pages, split
  between every process mapping the file (PSS);
- ``tcg_code``: the TCG translation buffer, the one anonymous ``rwx`` mapping
  (``-accel tcg,tb-size=``): translated guest code and its TB descriptors;
- ``malloc``: glibc's main heap (``[heap]``) and its per-thread arenas
  (anonymous mappings at a 64 MiB boundary that, with their reserved ``---p``
  tail, span 64 MiB);
- ``stacks``: the main stack, every mapping holding a thread's stack pointer
  (``/proc/<pid>/task/*/syscall``; a running thread shows none) and the stack
  sizes glibc and QEMU allocate (8 MiB threads, 1 MiB coroutines: anonymous
  ``rw-p`` right above a ``---p`` guard page);
- ``libraries``: the QEMU binary and its shared libraries; their private part is
  relocations and .data/.bss written at start-up;
- ``other_files``: any other file mapping (the kernel and initrd QEMU loaded);
- ``anon_other``: every other anonymous mapping: mallocs above the mmap
  threshold, the softmmu TLBs, the TB hash table, ROM RAM blocks.

Every class reports its PSS, RSS and private KiB; private is smaps' ``Anonymous``
(pages no other process can share: copy-on-write copies, heap, code buffer), not
``Private_Clean``, which would count a file's page-cache pages as this fork's own
whenever no other process happens to map them. ``pss - private`` is a class's
share of pages other processes may map too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

CLASSES = (
    "guest_ram_private",
    "guest_ram_shared",
    "tcg_code",
    "malloc",
    "stacks",
    "libraries",
    "other_files",
    "anon_other",
)
STACK_SIZES = (1 << 20, 8 << 20)  # QEMU's COROUTINE_STACK_SIZE; glibc's thread default (RLIMIT_STACK)
ARENA_SPAN = 64 << 20  # glibc HEAP_MAX_SIZE on 64-bit: arenas are aligned to and span at most this
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")
_FIELDS = ("Rss", "Pss", "Anonymous")


@dataclass
class Mapping:
    start: int
    end: int
    perms: str
    path: str
    kib: dict[str, int] = field(default_factory=dict)

    @property
    def anonymous(self) -> bool:
        return not self.path

    @property
    def private_kib(self) -> int:
        return self.kib.get("Anonymous", 0)


def parse_smaps(text: str) -> list[Mapping]:
    maps: list[Mapping] = []
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            maps.append(Mapping(int(m[1], 16), int(m[2], 16), m[3], m[4].strip()))
            continue
        key, _, rest = line.partition(":")
        if maps and key in _FIELDS:
            maps[-1].kib[key] = int(rest.split()[0])
    return maps


def _arena_starts(maps: list[Mapping]) -> set[int]:
    """Starts of glibc arena heaps: an anonymous rw-p mapping on a 64 MiB boundary
    that, with its reserved ---p remainder (none once the arena is full), spans 64 MiB."""
    starts = set()
    for i, m in enumerate(maps):
        if not (m.anonymous and m.perms == "rw-p" and m.start % ARENA_SPAN == 0):
            continue
        end = m.end
        nxt = maps[i + 1] if i + 1 < len(maps) else None
        if nxt is not None and nxt.anonymous and nxt.perms == "---p" and nxt.start == m.end:
            end = nxt.end
        if end - m.start == ARENA_SPAN:
            starts.add(m.start)
    return starts


def thread_stack_pointers(pid: int) -> list[int]:
    """The user stack pointer of each of ``pid``'s threads (blocked ones report it
    in /proc/<pid>/task/<tid>/syscall; a running thread reports none)."""
    sps = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "syscall").read_text().split()
        except OSError:
            continue
        if len(fields) >= 8:  # "nr a1 .. a6 sp pc"; "running" or "-1 sp pc" otherwise
            sps.append(int(fields[-2], 16))
        elif len(fields) == 3:
            sps.append(int(fields[1], 16))
    return sps


def classify(
    maps: list[Mapping], ram_path: str, stack_pointers: Iterable[int] = (), exe_name: str = "qemu-system-x86_64"
) -> list[tuple[str, Mapping]]:
    """Each mapping with its class; the RAM file's mapping is class ``guest_ram``,
    split into its private and shared part by :func:`summarize`."""
    arenas = _arena_starts(maps)
    sps = list(stack_pointers)
    out = []
    for i, m in enumerate(maps):
        prev = maps[i - 1] if i else None
        if m.path == ram_path:
            cls = "guest_ram"
        elif m.anonymous and "x" in m.perms:
            cls = "tcg_code"
        elif m.path == "[heap]" or m.start in arenas:
            cls = "malloc"
        elif m.path == "[stack]" or (m.anonymous and any(m.start <= sp < m.end for sp in sps)) or (
            m.anonymous and m.perms == "rw-p" and m.end - m.start in STACK_SIZES and prev is not None
            and prev.anonymous and prev.perms == "---p" and prev.end == m.start
        ):
            cls = "stacks"
        elif m.path.startswith("/") and (".so" in Path(m.path).name or Path(m.path).name == exe_name):
            cls = "libraries"
        elif m.path.startswith("/"):
            cls = "other_files"
        elif m.anonymous:
            cls = "anon_other"
        else:
            cls = "libraries"  # [vdso], [vvar], [vsyscall]: the kernel's, a few KiB
        out.append((cls, m))
    return out


def breakdown(pid: int, ram_path: Path | str) -> dict[str, dict[str, int]]:
    """``{class: {"pss": KiB, "rss": KiB, "private": KiB}}`` for one process, every class present."""
    sps = thread_stack_pointers(pid)
    text = Path(f"/proc/{pid}/smaps").read_text()
    return summarize(classify(parse_smaps(text), str(Path(ram_path).resolve()), sps))


def summarize(classified: Iterable[tuple[str, Mapping]]) -> dict[str, dict[str, int]]:
    sums = {cls: {"pss": 0, "rss": 0, "private": 0} for cls in CLASSES}
    for cls, m in classified:
        pss, rss, private = m.kib.get("Pss", 0), m.kib.get("Rss", 0), m.private_kib
        if cls == "guest_ram":
            # Copy-on-write copies count whole in PSS: the rest is the page cache's share.
            parts = {"guest_ram_private": (private, private, private),
                     "guest_ram_shared": (pss - private, rss - private, 0)}
        else:
            parts = {cls: (pss, rss, private)}
        for name, (p, r, v) in parts.items():
            sums[name]["pss"] += p
            sums[name]["rss"] += r
            sums[name]["private"] += v
    return sums


def per_fork_mib(breakdowns: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, float]]:
    """The mean over forks of each class, in MiB (one decimal)."""
    n = max(1, len(breakdowns))
    return {
        cls: {k: round(sum(b[cls][k] for b in breakdowns) / n / 1024, 1) for k in ("pss", "rss", "private")}
        for cls in CLASSES
    }


JIT_FIELDS = {"gen code size": "code_bytes", "TB count": "tbs", "TB flush count": "flushes"}


def parse_info_jit(text: str) -> dict[str, int]:
    """The TCG figures of HMP ``info jit``: bytes of the translation buffer in use
    (``gen code size N/SIZE``), translated blocks, and how often the buffer filled
    up and was flushed (each flush makes the guest's hot code be translated again)."""
    out = {}
    for line in text.splitlines():
        for label, key in JIT_FIELDS.items():
            m = re.match(rf"\s*{label}\s+(\d+)", line)
            if m:
                out[key] = int(m[1])
    return out


def tcg_stats(vm: Any) -> dict[str, int]:
    """``parse_info_jit`` of a running fork ({} under KVM, which has no translator)."""
    qemu = vm.engine.qemu  # the benchmark's view into the VM's QEMU
    return parse_info_jit(str(qemu.cmd("human-monitor-command", **{"command-line": "info jit"})))
