"""The guest end of a mailbox: one page of locked memory the host writes into.

The agent maps a page per mailbox at boot, locks it, and reports its physical
address (Describe); the host then patches payloads straight into guest memory of a
paused or restored VM. The layout and codec are pytest_vmfork/mailbox.py, shared
byte for byte with the host; what a resume does with a delivery is resume.py.
"""

from __future__ import annotations

import ctypes
import mmap
import struct

from pytest_vmfork import mailbox as mbx

_libc = ctypes.CDLL(None, use_errno=True)


class GuestMailbox:
    """One page of mlock'ed memory whose physical address the host learns."""

    def __init__(self, name: str, nonce: bytes) -> None:
        self.name = name
        self.size = mbx.PAGE_SIZE
        self.mem = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.mem[:] = mbx.initial_image(name, nonce, self.size)  # faults the page in
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        if _libc.mlock(ctypes.c_void_p(self.addr), ctypes.c_size_t(self.size)) != 0:
            raise OSError(ctypes.get_errno(), f"mlock mailbox {name}")
        self.phys = self._physical_address()
        self.last_seq = mbx.sequence_of(self.mem)
        self.payload = b""
        self.generation = 0

    def _physical_address(self) -> int:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek((self.addr // mbx.PAGE_SIZE) * 8)
            (entry,) = struct.unpack("<Q", f.read(8))
        if not entry >> 63 & 1:
            raise RuntimeError(f"mailbox {self.name} page is not present")
        pfn = entry & ((1 << 55) - 1)
        if pfn == 0:
            raise RuntimeError("pagemap hides PFNs: the agent must run as root")
        return pfn * mbx.PAGE_SIZE

    def take(self) -> mbx.Delivery | None:
        got = mbx.read(self.mem, self.last_seq)
        if got is not None:
            self.last_seq = got.sequence
        return got

