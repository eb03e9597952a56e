"""The guest's event channel: readiness lines up, the resume doorbell down.

The ``org.vmfork.evt`` virtio-serial port (our end: a socketpair QEMU
inherited, pytest_vmfork/vm/vmm.py) carries ``vmfork-evt k=v ...`` lines from
the guest agent (ready after a boot or a resume, or an error) and, the other
way, the one doorbell byte the guest reads the moment its vCPUs run again.

It is apart from the QEMU process because it is the channel whose reader must
treat the guest as hostile: a line is bounded (:data:`MAX_EVENT_LINE`), lines
are rate-limited (a token bucket: :data:`EVENT_RATE_PER_S`, :data:`EVENT_BURST`),
and a guest that breaks either is cut off through ``on_fault`` (its owner
kills the QEMU); at most one partial line and :data:`EVENT_LINES_KEPT` past
lines are held. Its failures are VMForkErrors: EventChannelError once the
channel is closed, QemuTimeout when an awaited event does not come.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import Callable

from pytest_vmfork.errors import EventChannelError, QemuTimeout
from pytest_vmfork.vm import qmploop

#: What the host writes to resume the guest's agent (guest/vmfork_agent/server.py waits for it).
DOORBELL = b"R"
#: The prefix of an event line; any other line on the port is ignored.
EVENT_PREFIX = "vmfork-evt "
#: Bounds on the guest's event channel (untrusted input): the longest line, and
#: a token bucket of lines (a fork emits a handful; a flood is an attack or a bug).
MAX_EVENT_LINE = 4096
EVENT_RATE_PER_S = 200.0
EVENT_BURST = 400
EVENT_LINES_KEPT = 64
#: Seconds the doorbell may take to reach QEMU's side of the socket.
DOORBELL_TIMEOUT_S = 5.0

Fields = dict[str, str]


def parse_event(text: str) -> Fields | None:
    """The ``key=value`` fields of an event line; None for a line that is not one."""
    if not text.startswith(EVENT_PREFIX):
        return None
    return dict(tok.partition("=")[::2] for tok in text.split(" ")[1:] if "=" in tok)


class EventLines:
    """Splits the port's bytes into lines within the channel's bounds (no I/O:
    ``clock`` is the token bucket's time source)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._partial = b""
        self._tokens = float(EVENT_BURST)
        self._last = clock()

    def feed(self, chunk: bytes) -> list[str]:
        """The lines ``chunk`` completes (stripped, non-ASCII replaced). Raises
        EventChannelError naming the bound the guest broke: the channel is over."""
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        if len(self._partial) > MAX_EVENT_LINE or any(len(raw) > MAX_EVENT_LINE for raw in complete):
            raise EventChannelError(f"the guest sent an event line longer than {MAX_EVENT_LINE} bytes")
        now = self._clock()
        refill = (now - self._last) * EVENT_RATE_PER_S
        self._tokens = min(float(EVENT_BURST), self._tokens + refill) - len(complete)
        self._last = now
        if self._tokens < 0:
            raise EventChannelError(f"the guest flooded the event channel (more than {EVENT_BURST} lines "
                                    f"at once or {EVENT_RATE_PER_S:g} lines/s)")
        return [raw.decode("ascii", "replace").strip() for raw in complete]


class EventChannel:
    """One VM's event channel. Waiters register before they trigger an event
    (:meth:`expect`), so no wake-up is lost.

    ``fault`` is why the VM was cut off (set by the owner, whoever found the
    fault): the reader stops and every waiter fails naming it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
        self.name = name
        self.fault: str | None = None
        self.lines: deque[str] = deque(maxlen=EVENT_LINES_KEPT)
        self._reader = reader
        self._writer = writer
        self._waiters: list[tuple[Callable[[Fields], bool], asyncio.Future[Fields]]] = []
        self._pump: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, sock: socket.socket, name: str) -> EventChannel:
        """The channel over our end of the event port's socketpair (on the loop)."""
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer, name)

    def start(self, on_fault: Callable[[str], None]) -> None:
        """Start reading (on the loop). ``on_fault(why)`` is called when the guest
        breaks the channel's bounds; it is expected to kill the VM and set ``fault``."""
        self._pump = asyncio.ensure_future(self._read(on_fault))

    def at_eof(self) -> bool:
        """True once QEMU closed its end (it exited or is exiting)."""
        return self._reader.at_eof()

    def _closed(self) -> EventChannelError:
        return EventChannelError(f"event channel closed: {self.fault or 'QEMU exited'}")

    async def _read(self, on_fault: Callable[[str], None]) -> None:
        lines = EventLines()
        while self.fault is None:
            chunk = await self._reader.read(65536)
            if not chunk:
                break
            try:
                complete = lines.feed(chunk)
            except EventChannelError as exc:
                on_fault(str(exc))
                break
            for text in complete:
                self._dispatch(text)
        error = self._closed()
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(error)

    def _dispatch(self, text: str) -> None:
        self.lines.append(text)
        fields = parse_event(text)
        if fields is None:
            return
        for pred, fut in list(self._waiters):
            if not fut.done() and pred(fields):
                fut.set_result(fields)

    def expect(self, pred: Callable[[Fields], bool]) -> asyncio.Future[Fields]:
        """Register interest in a guest event *before* triggering it (no lost wake-ups)."""

        async def register() -> asyncio.Future[Fields]:
            fut: asyncio.Future[Fields] = asyncio.get_running_loop().create_future()
            self._waiters.append((pred, fut))
            if self._pump is not None and self._pump.done():
                fut.set_exception(self._closed())
            return fut

        return qmploop.run(register())

    def wait(self, fut: asyncio.Future[Fields], timeout: float) -> Fields:
        """Wait for a registered event: its fields; QemuTimeout (a TimeoutError) after
        ``timeout`` seconds, EventChannelError (an EOFError) if the channel closed first."""

        async def wait() -> Fields:
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout)
            except TimeoutError as exc:
                raise QemuTimeout(f"no event from the guest of {self.name} within {timeout:g}s") from exc
            finally:
                if fut.done():
                    self._waiters[:] = [w for w in self._waiters if w[1] is not fut]

        return qmploop.run(wait())

    def ring_doorbell(self) -> None:
        """Queue the resume doorbell; the guest reads it the moment it runs."""

        async def ring() -> None:
            try:
                self._writer.write(DOORBELL)
                await self._writer.drain()
            except OSError as exc:
                raise self._closed() from exc

        qmploop.run(ring(), DOORBELL_TIMEOUT_S, what=f"the resume doorbell of {self.name}")

    async def close(self) -> None:
        """Stop reading and close our end (on the loop; never raises)."""
        self._writer.close()
        if self._pump is not None:
            self._pump.cancel()
