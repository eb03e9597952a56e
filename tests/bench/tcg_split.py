"""Which guest code a fork's QEMU translates, by guest address: kernel or user space.

HMP ``info jit`` gives one TB count per QEMU; it cannot say whether the blocks a
stage made were the guest kernel's or the agent's (Python, and the program an exec
starts). Debian's QEMU 7.2 has no TCG plugins, but it has the ``translate_block``
trace event (log backend): ``-d trace:translate_block -D FILE`` writes one line per
block it translates, with the block's guest virtual PC, and flushes it per block
(the count in the file matches ``info jit``'s exactly once the guest is idle). The
other way, ``-d in_asm``, disassembles every block: measured on one cold fork, 4x
the bytes (its first exec filled a fork's 8 MiB file limit, ``vmm.FORK_FILE_LIMIT``,
so later blocks were lost) and twice the first exec's time; :func:`block_pcs` reads
its format too. A cold fork's trace log to its second exec is ~3 MB.

A bench records the log's size at each stage boundary (:func:`log_size`) and
:func:`split` classes each stage's blocks: ``kernel`` at or above the x86-64
kernel half (:data:`KERNEL_BASE`), ``user`` below it.

:func:`logging_blocks` adds the options to every fork started inside it, the way
``fork_knobs.py`` wraps ``vmm.MachineSpec.argv``: the library is left alone.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pytest_vmfork.vm import vmm

#: QEMU's log items for one line per translated block (``-d``).
LOG_ITEMS = "trace:translate_block"
#: The log's name in each fork's work directory (removed with it).
LOG_NAME = "tcg-blocks.log"
#: x86-64's canonical upper half, where the kernel lives (4- and 5-level paging alike
#: put user space below 0x0000_8000_0000_0000 / 0x0100_0000_0000_0000).
KERNEL_BASE = 0xFFFF_8000_0000_0000
#: ``translate_block tb:0x..., pc:0x..., tb_code:0x...``, maybe after ``PID@TIME:``.
_TRACE = re.compile(r"translate_block tb:\S+ pc:0x([0-9a-fA-F]+)")
#: ``-d in_asm``: an ``IN: [symbol]`` header, then ``0xPC:  bytes  insn`` lines.
_INSN = re.compile(r"0x([0-9a-fA-F]+):")


def block_pcs(text: str) -> list[int]:
    """The guest PC of every block in a translation log, in translation order: the
    ``translate_block`` trace lines, or each ``in_asm`` block's first instruction."""
    pcs: list[int] = []
    header = False
    for line in text.splitlines():
        if header:
            m = _INSN.match(line)
            if m:
                pcs.append(int(m[1], 16))
            header = False
        elif line.startswith("IN:"):
            header = True
        else:
            m = _TRACE.search(line)
            if m:
                pcs.append(int(m[1], 16))
    return pcs


def classify(pcs: list[int]) -> dict[str, int]:
    """``{"kernel": n, "user": n}``: blocks at or above :data:`KERNEL_BASE`, and below."""
    kernel = sum(pc >= KERNEL_BASE for pc in pcs)
    return {"kernel": kernel, "user": len(pcs) - kernel}


def split(log: bytes, marks: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """Each stage's blocks, classed: ``marks`` maps stage names, in order, to the
    log's size when the stage ended; a stage is the bytes since the previous mark.
    A mark inside a line (a block being written) counts that block in the next stage."""
    out: dict[str, dict[str, int]] = {}
    start = 0
    for stage, end in marks.items():
        if end < start or end > len(log):
            raise ValueError(f"stage {stage!r} ends at byte {end}, outside {start}..{len(log)}: "
                             "pass the log's sizes in stage order, read after the stage")
        cut = log.rfind(b"\n", start, end) + 1 or start  # whole lines only
        out[stage] = classify(block_pcs(log[start:cut].decode("utf-8", "replace")))
        start = cut
    return out


def log_path(vm: Any) -> Path:
    """Where :func:`logging_blocks` has ``vm``'s QEMU write its blocks."""
    return Path(vm.dir) / LOG_NAME


def log_size(vm: Any) -> int:
    """The bytes ``vm``'s QEMU has logged so far (a stage boundary for :func:`split`)."""
    return log_path(vm).stat().st_size


@contextlib.contextmanager
def logging_blocks() -> Iterator[None]:
    """Every fork started inside logs its translated blocks to :func:`log_path`
    (templates, booted with ``shared``, are left alone)."""
    stock = vmm.MachineSpec.argv

    def argv(self: vmm.MachineSpec, **kw: Any) -> list[str]:
        out = stock(self, **kw)
        if kw["shared"]:
            return out
        # QEMU fopen()s the -D path itself, as the QEMU user, who cannot reach our
        # work directory: Handoff.ram's file fits (created here, never through a
        # symlink, writable by QEMU's group, named /proc/self/fd/N, which QEMU re-opens).
        path = kw["handoff"].ram(Path(kw["workdir"]) / LOG_NAME, 0, create=True)
        return [*out, "-d", LOG_ITEMS, "-D", path]

    vmm.MachineSpec.argv = argv  # type: ignore[method-assign]
    try:
        yield
    finally:
        vmm.MachineSpec.argv = stock  # type: ignore[method-assign]
