#!/usr/bin/env python3
"""pytest-vmfork guest agent: PID-1's long-lived helper inside every VM.

It serves the ``Agent`` service of pytest_vmfork/proto/agent.proto over one
virtio-serial port, owns the mailboxes the host patches into memory, and on
every resume (fork) it reseeds randomness, sets the clock, delivers mailbox
payloads, applies the network handoff and then tells the host it is ready.

This file is only the entry busybox init starts (``/opt/vmfork/agent.py``, see
inittab); the agent is the package ``vmfork_agent`` beside it (guest/vmfork_agent/),
whose modules are compiled to bytecode at image build, unlike a script run as
``__main__``.
"""

from vmfork_agent.server import main

if __name__ == "__main__":
    main()
