"""The benchmark's per-mapping breakdown of a fork's QEMU memory (tests/bench/forkmem.py)."""

from tests.bench.forkmem import CLASSES, classify, parse_info_jit, parse_smaps, per_fork_mib, summarize

RAM = "/cache/snapshots/k/memory.ram"


def entry(start: int, end: int, perms: str, path: str = "", rss: int = 0, pss: int | None = None,
          anon: int | None = None) -> str:
    return (f"{start:x}-{end:x} {perms} 00000000 00:00 0    {path}\n"
            f"Size: {(end - start) >> 10} kB\nRss: {rss} kB\nPss: {rss if pss is None else pss} kB\n"
            f"Anonymous: {rss if anon is None else anon} kB\nVmFlags: rd wr mr mw me ac\n")


MB = 1 << 20
SMAPS = "".join([
    entry(0x5600_0000_0000, 0x5600_0000_0000 + 4 * MB, "r-xp", "/usr/bin/qemu-system-x86_64", 4096, 1024, 0),
    entry(0x5600_1000_0000, 0x5600_1000_0000 + 8 * MB, "rw-p", "[heap]", 6000),
    entry(0x7f00_0000_0000, 0x7f00_0000_0000 + 4 * MB, "rw-p", "", 4000),  # arena, 64 MiB aligned
    entry(0x7f00_0000_0000 + 4 * MB, 0x7f00_0400_0000, "---p"),  # its reserved tail
    entry(0x7f00_1000_0000, 0x7f00_1000_1000, "---p"),  # guard page
    entry(0x7f00_1000_1000, 0x7f00_1000_1000 + 8 * MB, "rw-p", "", 12),  # thread stack
    entry(0x7f00_2000_0000, 0x7f00_2000_0000 + 256 * MB, "rw-p", RAM, 60000, 8000, 5000),
    entry(0x7f00_4000_0000, 0x7f00_4000_0000 + 1024 * MB, "rwxp", "", 30720),
    entry(0x7f00_9012_3000, 0x7f00_9012_3000 + 3 * MB, "rw-p", "", 2000),  # a big malloc
    entry(0x7f00_a000_0000, 0x7f00_a000_0000 + 2 * MB, "r--p", "/images/k/initrd.img", 100, 100, 0),
    entry(0x7f00_b000_0000, 0x7f00_b000_0000 + 2 * MB, "r-xp", "/usr/lib/libc.so.6", 1000, 100, 0),
    entry(0x7ffe_0000_0000, 0x7ffe_0002_1000, "rw-p", "[stack]", 48),
])


def test_every_mapping_gets_its_class() -> None:
    classes = [cls for cls, _ in classify(parse_smaps(SMAPS), RAM)]
    assert classes == ["libraries", "malloc", "malloc", "anon_other", "anon_other", "stacks", "guest_ram",
                       "tcg_code", "anon_other", "other_files", "libraries", "stacks"]


def test_guest_ram_splits_into_copied_and_shared_pages() -> None:
    sums = summarize(classify(parse_smaps(SMAPS), RAM))
    assert sums["guest_ram_private"] == {"pss": 5000, "rss": 5000, "private": 5000}
    assert sums["guest_ram_shared"] == {"pss": 3000, "rss": 55000, "private": 0}
    assert sums["tcg_code"]["pss"] == 30720
    assert sums["malloc"]["pss"] == 10000
    assert sums["libraries"] == {"pss": 1124, "rss": 5096, "private": 0}
    assert sum(c["pss"] for c in sums.values()) == sum(m.kib["Pss"] for m in parse_smaps(SMAPS))


def test_a_thread_stack_is_found_by_its_stack_pointer() -> None:
    text = entry(0x7f00_3012_3000, 0x7f00_3012_3000 + 2 * MB, "rw-p", "", 64)  # no guard, odd size
    assert [c for c, _ in classify(parse_smaps(text), RAM)] == ["anon_other"]
    assert [c for c, _ in classify(parse_smaps(text), RAM, [0x7f00_3012_3000 + MB])] == ["stacks"]


def test_per_fork_means_cover_every_class() -> None:
    one = summarize(classify(parse_smaps(SMAPS), RAM))
    mean = per_fork_mib([one, one])
    assert set(mean) == set(CLASSES)
    assert mean["tcg_code"]["pss"] == 30.0


def test_info_jit_figures() -> None:
    text = ("Translation buffer state:\ngen code size       30654739/1073736704\nTB count            53362\n"
            "cross page TB count 168 (0%)\n\nStatistics:\nTB flush count      1\nTB invalidate count 0\n")
    assert parse_info_jit(text) == {"code_bytes": 30654739, "tbs": 53362, "flushes": 1}
