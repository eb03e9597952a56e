"""The run's network: its bridge, a TAP per fork, addresses leased between runs.

``netlink`` (pyroute2 calls made safe from any thread), ``subnets`` (the subnet
pool and the bridge, TAP and MAC names derived from a subnet), ``leaseroot``
(where lease files live, their lock and record helpers), ``leases`` (host-wide
subnet leases: which run owns which subnet, reclaiming dead runs'),
``forkleases`` (per-run fork leases: each fork's address, MAC and TAP name),
``network`` (``RunNetwork``: bridge, TAPs, the guest's UDP ack).

May import: ``pytest_vmfork.host`` and the bottom layer (errors, settings, the
mailbox codec). Nothing here starts a VM.
"""
