"""The run's network: its bridge, a TAP per fork, addresses leased between runs.

``netlink`` (message builders shared by host and guest), ``leases`` (addresses and
names claimed across processes and runs), ``network`` (``RunNetwork``: bridge, TAPs,
the guest's UDP ack).

May import: ``pytest_vmfork.host`` and the bottom layer (errors, settings, the
mailbox codec). Nothing here starts a VM.
"""
