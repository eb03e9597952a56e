"""The benchmark's kernel / user split of a translation log (tests/bench/tcg_split.py)."""

import pytest

from tests.bench.tcg_split import block_pcs, classify, split

KERNEL = 0xFFFFFFFF81C00EF0
AGENT = 0x7F3A12345000  # a shared library of the agent's Python
PROGRAM = 0x55D0C0DE1000  # an exec'd program's text


def trace(pc: int, tb: int = 0x7FEF18000040) -> str:
    return f"translate_block tb:0x{tb:x}, pc:0x{pc:x}, tb_code:0x{tb + 0xC0:x}\n"


def test_trace_lines_give_each_block_pc_in_order() -> None:
    text = trace(KERNEL) + "12345@1700000000.000001:" + trace(AGENT) + "an unrelated log line\n" + trace(PROGRAM)
    assert block_pcs(text) == [KERNEL, AGENT, PROGRAM]


def test_in_asm_blocks_count_once_by_their_first_instruction() -> None:
    text = (
        "----------------\nIN: \n"
        f"0x{KERNEL:016x}:  0f 01 ca                 clac     \n\n"
        "----------------\nIN: _start\n"
        f"0x{PROGRAM:016x}:  56                       pushq    %rsi\n"
        f"0x{PROGRAM + 1:016x}:  48 8b 74 24 08           movq     8(%rsp), %rsi\n\n"
    )
    assert block_pcs(text) == [KERNEL, PROGRAM]


def test_the_kernel_is_the_upper_half() -> None:
    assert classify([KERNEL, 0xFFFF800000000000, 0x7FFFFFFFFFFF, AGENT, PROGRAM]) == {"kernel": 2, "user": 3}


def test_each_stage_holds_the_blocks_logged_since_the_previous_mark() -> None:
    ready = (trace(KERNEL) * 3 + trace(AGENT)).encode()
    first = (trace(KERNEL) * 2 + trace(AGENT) * 4 + trace(PROGRAM) * 5).encode()
    second = trace(AGENT).encode()
    log = ready + first + second
    marks = {"ready": len(ready), "first_exec": len(ready + first), "second_exec": len(log)}
    assert split(log, marks) == {
        "ready": {"kernel": 3, "user": 1},
        "first_exec": {"kernel": 2, "user": 9},
        "second_exec": {"kernel": 0, "user": 1},
    }


def test_a_block_half_written_at_a_mark_counts_in_the_next_stage() -> None:
    log = (trace(KERNEL) + trace(AGENT)).encode()
    assert split(log, {"ready": len(trace(KERNEL)) + 10, "first_exec": len(log)}) == {
        "ready": {"kernel": 1, "user": 0},
        "first_exec": {"kernel": 0, "user": 1},
    }


def test_marks_out_of_order_are_refused() -> None:
    log = (trace(KERNEL) * 2).encode()
    with pytest.raises(ValueError, match="stage order"):
        split(log, {"ready": len(log), "first_exec": 10})
