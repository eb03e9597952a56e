"""Background processes: Spawn, ReadProcess (a long poll) and SignalProcess.

A spawned program outlives its call: its output is kept in two bounded streams the
host reads by offset, a long poll waits on the loop's timers (never a thread), and
the records are capped. Apart from programs.py, which only starts and watches a
program, because the record and its polls are a concept of their own.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from vmfork_agent.calls import CHUNK, Call, CallError, invalid, os_error
from vmfork_agent.programs import Program

from pytest_vmfork.proto import agent_pb2 as pb

if TYPE_CHECKING:
    from vmfork_agent.server import Agent

OUTPUT_LIMIT = 1 << 20  # default bytes kept per spawned process stream
MAX_OUTPUT_LIMIT = 64 << 20
MAX_PROCESSES = 1024  # records kept; the oldest exited ones go first
MAX_WAIT_S = 10.0  # a ReadProcess long poll waits at most this long
EXIT_DRAIN_S = 1.0  # after a spawned program exits, output still in its pipes is awaited this long


class Stream:
    """The newest ``limit`` bytes of one output pipe and how many it produced."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.total = 0  # bytes produced; buf holds [total - len(buf), total)

    def append(self, data: bytes) -> None:
        self.buf += data
        self.total += len(data)
        if len(self.buf) > self.limit:
            del self.buf[: len(self.buf) - self.limit]

    def since(self, offset: int, max_bytes: int) -> tuple[bytes, int]:
        start = max(offset, self.total - len(self.buf))
        at = start - (self.total - len(self.buf))
        return bytes(self.buf[at : at + max_bytes]), start


class Waiter:
    """A ReadProcess long poll: answered on news or at its timer."""

    def __init__(self, call: Call, out_off: int, err_off: int, max_bytes: int) -> None:
        self.call, self.out_off, self.err_off, self.max_bytes = call, out_off, err_off, max_bytes
        self.timer: list | None = None


class GuestProcess:
    """A spawned program: its output kept in bounded streams, its long polls waiting."""

    def __init__(self, agent: Agent, argv: list[str], req, limit: int) -> None:
        self.agent = agent
        self.streams = (Stream(limit), Stream(limit))
        self.returncode: int | None = None  # set once reaped and its output drained (or EXIT_DRAIN_S)
        self.waiters: list[Waiter] = []
        self.drain_timer = None
        self.prog = Program(agent, argv, req, req.stdin if req.has_stdin else None, self.output, self.exit)
        self.pid = self.prog.pid

    def output(self, which: int, data: bytes, fd: int) -> None:
        if data:
            self.streams[which].append(data)
        elif not self.prog.pipes and self.prog.returncode is not None:
            self.settle()
        self.wake()

    def exit(self, code: int) -> None:
        if not self.prog.pipes:
            self.settle()
        else:  # what it wrote before exiting; bounded, a child may hold the pipe
            self.drain_timer = self.agent.call_later(EXIT_DRAIN_S, self.settle)
        self.wake()

    def settle(self) -> None:
        if self.drain_timer is not None:
            self.agent.cancel_timer(self.drain_timer)
            self.drain_timer = None
        self.returncode = self.prog.returncode
        self.wake()

    def changed(self, out_off: int, err_off: int) -> bool:
        out, err = self.streams
        return self.returncode is not None or out.total > out_off or err.total > err_off

    def state(self, out_off: int, err_off: int, max_bytes: int):
        out, err = self.streams
        out_data, out_start = out.since(out_off, max_bytes)
        err_data, err_start = err.since(err_off, max_bytes)
        return pb.ProcessState(
            exited=self.returncode is not None, returncode=self.returncode or 0,
            stdout=out_data, stdout_start=out_start, stdout_total=out.total,
            stderr=err_data, stderr_start=err_start, stderr_total=err.total,
        )

    def read(self, call: Call, req) -> None:
        """Answer now if there is news or no wait; else when there is, or at the wait's end."""
        max_bytes = min(req.max_bytes or CHUNK, CHUNK)
        wait_s = min(max(req.wait_s, 0.0), MAX_WAIT_S)
        if wait_s <= 0 or self.changed(req.stdout_offset, req.stderr_offset):
            call.finish(self.state(req.stdout_offset, req.stderr_offset, max_bytes))
            return
        waiter = Waiter(call, req.stdout_offset, req.stderr_offset, max_bytes)
        waiter.timer = self.agent.call_later(wait_s, lambda: self.answer(waiter))
        self.waiters.append(waiter)

    def answer(self, waiter: Waiter) -> None:
        if waiter not in self.waiters:
            return
        self.waiters.remove(waiter)
        self.agent.cancel_timer(waiter.timer)
        waiter.call.finish(self.state(waiter.out_off, waiter.err_off, waiter.max_bytes))

    def wake(self) -> None:
        for waiter in list(self.waiters):
            if not waiter.call.live:
                self.waiters.remove(waiter)
                self.agent.cancel_timer(waiter.timer)
            elif self.changed(waiter.out_off, waiter.err_off):
                self.answer(waiter)



class Processes:
    """The spawned programs by pid (at most ``MAX_PROCESSES`` records) and the calls on them."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.procs: dict[int, GuestProcess] = {}

    def spawn(self, call: Call, req) -> None:
        argv = list(req.argv)
        if not argv:
            raise invalid("argv is empty")
        limit = min(req.output_limit or OUTPUT_LIMIT, MAX_OUTPUT_LIMIT)
        try:
            p = GuestProcess(self.agent, argv, req, limit)
        except OSError as exc:
            raise os_error(exc, exc.filename if isinstance(exc.filename, str) else argv[0]) from None
        self.procs[p.pid] = p
        if len(self.procs) > MAX_PROCESSES:
            for pid in [pid for pid, q in self.procs.items() if q.returncode is not None]:
                del self.procs[pid]
                if len(self.procs) <= MAX_PROCESSES:
                    break
        call.finish(pb.SpawnResponse(pid=p.pid))

    def _process(self, pid: int) -> GuestProcess:
        p = self.procs.get(pid)
        if p is None:
            raise CallError("NOT_FOUND", f"no spawned process with pid {pid}")
        return p

    def read(self, call: Call, req) -> None:
        self._process(req.pid).read(call, req)

    def signal(self, call: Call, req) -> None:
        p = self._process(req.pid)
        if p.prog.returncode is not None:  # reaped (only the loop reaps): the pid may be another's now
            call.finish(pb.SignalProcessResponse(delivered=False))
            return
        try:
            (os.killpg if req.group else os.kill)(req.pid, req.signal)
        except ProcessLookupError:
            call.finish(pb.SignalProcessResponse(delivered=False))
            return
        except OSError as exc:
            raise os_error(exc, f"pid {req.pid}") from None
        call.finish(pb.SignalProcessResponse(delivered=True))
