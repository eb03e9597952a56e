"""The agent: one selector loop over the two ports, every program's pipes and exit,
and every timer; the channel's framing and dispatch; the events to the host.

Channels (both virtio-serial, so neither depends on the guest's network):
- ``org.vmfork.ctl``: length-prefixed protobuf messages multiplexed by stream
  id (pytest_vmfork/channel.py; docs/protocol.md is the specification).
- ``org.vmfork.evt``: line events to the host (``vmfork-evt event=ready ...``);
  from the host, a single doorbell byte queued *before* the vCPUs resume, so
  the loop's ``select`` returns the moment the fork runs (resume.py). No polling
  and no host-to-guest request on the resume path.

Each method of agent.proto is one handler ``(call, request)`` in the table built
here; the capabilities live in their own modules (programs, processes, files,
shell, network). A thread runs only what must block (reading a file or tree out,
the pyroute2 network fallback).
"""

from __future__ import annotations

import heapq
import os
import select
import selectors
import socket
import threading
import time

from vmfork_agent import files
from vmfork_agent.boot import AGENT_VERSION, START, cmdline_params, find_port, log
from vmfork_agent.calls import Call, CallError, invalid
from vmfork_agent.files import PutFileCall, PutTreeCall
from vmfork_agent.mailboxes import GuestMailbox
from vmfork_agent.network import Network
from vmfork_agent.processes import Processes
from vmfork_agent.programs import CHILD_ENV, ExecCall
from vmfork_agent.resume import MAILBOX_DIR, RUN_DIR, on_resume
from vmfork_agent.shell import ShellCall

from pytest_vmfork import channel as ch
from pytest_vmfork import mailbox as mbx
from pytest_vmfork.proto import agent_pb2 as pb

PORT_CTL = "org.vmfork.ctl"
PORT_EVT = "org.vmfork.evt"
DOORBELL = b"R"
READ_SIZE = 1 << 16


class Agent:
    """The agent's state: its ports, mailboxes, open streams, timers, processes and network;
    everything is opened and built at boot, so a fork's resume only uses it."""

    def __init__(self) -> None:
        params = cmdline_params()
        self.nonce = os.urandom(mbx.NONCE_SIZE)
        self.system = GuestMailbox(mbx.SYSTEM_MAILBOX, self.nonce)
        names = [n for n in params.get("mailboxes", "").split(",") if n]
        self.user = {n: GuestMailbox(n, self.nonce) for n in names}
        self.generation = 0
        self.token = ""
        self.kernel = os.uname().release
        self.urandom = os.open("/dev/urandom", os.O_WRONLY)
        self.devnull = os.open("/dev/null", os.O_RDONLY)
        self.devnull_w = os.open("/dev/null", os.O_WRONLY)
        os.makedirs(MAILBOX_DIR, exist_ok=True)
        self.evt = os.open(find_port(PORT_EVT), os.O_RDWR)
        self.evt_lock = threading.Lock()
        # The channel: one session at a time (0 until the first frame names one).
        self.ctl = os.open(find_port(PORT_CTL), os.O_RDWR | os.O_NONBLOCK)
        self.session = 0
        self.decoder = ch.Decoder(0, ch.MAX_REQUEST)
        self.streams: dict[int, Call] = {}
        self.wlock = threading.Lock()
        self.sel = selectors.DefaultSelector()
        self.timers: list[list] = []
        self.seq = 0
        self.sel.register(self.ctl, selectors.EVENT_READ, self.ctl_readable)
        self.sel.register(self.evt, selectors.EVENT_READ, self.evt_readable)
        self.processes = Processes(self)
        # Every handler a bound method, as before the split: on_frame's call site, which Python
        # 3.11 specializes in the template, sees one kind of callable (a mix deoptimizes it).
        by_name = {
            "Health": self.health, "Describe": self.describe, "ReadMailbox": self.read_mailbox,
            "Exec": self.start, "PutFile": self.start, "PutTree": self.start, "Shell": self.start,
            "GetFile": self.get_file, "GetTree": self.get_tree, "Spawn": self.processes.spawn,
            "ReadProcess": self.processes.read, "SignalProcess": self.processes.signal,
        }
        self.call_types = {ch.METHODS[name].id: cls for name, cls in (
            ("Exec", ExecCall), ("PutFile", PutFileCall), ("PutTree", PutTreeCall), ("Shell", ShellCall))}
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.network = Network()
        by_name["ReconfigureNetwork"] = self.network.reconfigure
        self.handlers = {m.id: by_name[m.name] for m in ch.METHODS.values()}  # every method has one

    # --- the loop ------------------------------------------------------------
    def call_later(self, delay: float, fn) -> list:
        self.seq += 1
        entry = [time.monotonic() + delay, self.seq, fn, True]
        heapq.heappush(self.timers, entry)
        return entry

    @staticmethod
    def cancel_timer(entry: list | None) -> None:
        if entry is not None:
            entry[3] = False

    def run(self) -> None:
        timers, select = self.timers, self.sel.select
        while True:
            while timers and not timers[0][3]:
                heapq.heappop(timers)
            events = select(max(timers[0][0] - time.monotonic(), 0.0) if timers else None)
            for key, mask in events:
                try:
                    key.data(key.fd, mask)
                except Exception as exc:  # one broken call must not take the agent down
                    log(f"loop: {exc!r}")
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                entry = heapq.heappop(timers)
                if entry[3]:
                    entry[3] = False
                    try:
                        entry[2]()
                    except Exception as exc:
                        log(f"timer: {exc!r}")

    def pause(self, fd: int, callback) -> None:
        """A port with no host behind it reads EOF at once: look again later (boot only)."""
        self.sel.unregister(fd)
        self.call_later(0.05, lambda: self.sel.register(fd, selectors.EVENT_READ, callback))

    # --- the channel ------------------------------------------------------------

    def write(self, frame: bytes) -> None:
        """Send one frame whole (frames of threads and of the loop never interleave)."""
        view = memoryview(frame)
        with self.wlock:
            while view:
                try:
                    view = view[os.write(self.ctl, view):]
                except BlockingIOError:
                    select.select([], [self.ctl], [], 1.0)

    def ctl_readable(self, fd: int, _mask: int) -> None:
        chunks = []
        for _ in range(256):  # a virtio-serial read returns one 4 KiB buffer: take what is queued
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                break
            if not data:
                if not chunks:
                    self.pause(fd, self.ctl_readable)
                break
            chunks.append(data)
        if not chunks:
            return
        try:
            frames = self.decoder.feed(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        except ch.ProtocolError as exc:
            log(f"channel: {exc}; input dropped")
            self.decoder.reset(self.session)
            return
        self.session = self.decoder.session
        for frame in frames:
            self.on_frame(frame)

    def reset_session(self, session: int) -> None:
        """A fork: whatever the snapshot had in flight belongs to a session no host will read."""
        self.session = session
        self.decoder.reset(session)
        streams, self.streams = self.streams, {}
        for call in streams.values():
            call.cancel()

    def on_frame(self, frame: ch.Frame) -> None:
        kind, stream = frame.kind, frame.stream
        if kind == ch.CALL:
            method = ch.BY_ID.get(frame.method)
            call = self.call_types.get(frame.method, Call)(self, stream)
            if method is None:
                call.fail(invalid(f"unknown method {frame.method}"))
                return
            self.streams[stream] = call
            try:
                self.handlers[method.id](call, method.request.FromString(frame.payload))
            except CallError as exc:
                call.fail(exc)
            except Exception as exc:
                call.fail(CallError("INTERNAL", f"{method.name}: {exc!r}"))
            return
        call = self.streams.get(stream)
        if call is None:
            return  # a stream that ended (e.g. failed mid-put): its later frames are dropped
        try:
            if kind == ch.DATA:
                call.data(frame.payload)
            elif kind == ch.END:
                call.end()
            elif kind == ch.CANCEL:
                self.streams.pop(stream, None)
                call.cancel()
        except CallError as exc:
            call.fail(exc)
        except Exception as exc:
            call.fail(CallError("INTERNAL", repr(exc)))

    # --- events to the host ------------------------------------------------

    def emit(self, **fields: object) -> None:
        line = b"vmfork-evt " + b" ".join(f"{k}={v}".encode() for k, v in fields.items()) + b"\n"
        with self.evt_lock:
            os.write(self.evt, line)

    # --- resume ------------------------------------------------------------

    def evt_readable(self, fd: int, _mask: int) -> None:
        data = os.read(fd, 64)
        if not data:  # no host listening (boot only)
            self.pause(fd, self.evt_readable)
            return
        if DOORBELL in data:
            try:
                on_resume(self)
            except Exception as exc:  # report, never die: the host waits for a line
                self.emit(event="error", stage="resume", detail=type(exc).__name__)
                log(f"resume failed: {exc!r}")

    # --- the methods about the agent itself ------------------------------------------

    def health(self, call: Call, req) -> None:
        call.finish(pb.HealthResponse(healthy=True, generation=self.generation, agent_version=AGENT_VERSION,
                                      uptime_s=time.monotonic() - START, kernel_release=self.kernel))

    def describe(self, call: Call, req) -> None:
        boxes = [self.system, *self.user.values()]
        call.finish(pb.DescribeResponse(
            nonce=self.nonce,
            mailboxes=[pb.MailboxInfo(name=b.name, guest_phys_addr=b.phys, size=b.size) for b in boxes],
            agent_version=AGENT_VERSION, kernel_release=self.kernel, generation=self.generation,
        ))

    def read_mailbox(self, call: Call, req) -> None:
        mb = self.user.get(req.name)
        if mb is None:
            raise CallError("NOT_FOUND", f"no mailbox named {req.name!r}")
        call.finish(pb.ReadMailboxResponse(payload=mb.payload, generation=mb.generation))

    # --- the methods run by a module of their own ------------------------------------

    def start(self, call: ExecCall | PutFileCall | PutTreeCall | ShellCall, req) -> None:
        """Exec, PutFile, PutTree and Shell: the call's own class (``call_types``) runs it."""
        call.start(req)

    def get_file(self, call: Call, req) -> None:
        files.get_file(call, req)

    def get_tree(self, call: Call, req) -> None:
        files.get_tree(call, req)


def main() -> None:
    os.makedirs(RUN_DIR, exist_ok=True)
    os.chdir("/")
    os.environ["PATH"] = CHILD_ENV["PATH"]  # posix_spawnp searches the agent's own PATH
    agent = Agent()
    log(f"ready: version {AGENT_VERSION}, kernel {agent.kernel}, mailboxes {sorted(agent.user)}")
    agent.emit(event="ready", gen=0, boot_ms=f"{(time.monotonic() - START) * 1e3:.0f}")
    agent.run()
