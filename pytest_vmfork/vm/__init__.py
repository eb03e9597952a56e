"""VMs: the QEMU process, snapshots, forks and what a test does with a fork.

From the bottom of this layer up: ``qmploop`` and ``vmm`` (one QEMU process and its
channels), ``agent`` (the control channel's client), ``command`` (the checks exec and
spawn share), ``process`` and ``files`` (the guest's processes and files), ``template``,
``accel``, ``migstream``, ``snapshot`` (boot, warm-up, save, verify, publish), ``layer``
(save a running fork), ``state`` (``VMState`` and the one transition table),
``payloads`` (``MailboxPayload``: per-fork data checked before any VM is touched),
``restore`` (``ForkEngine``: prepare, pre-warm and the one resume of a generation),
``handle`` (the public ``VM`` over an engine), ``fork`` (``fork()``), ``pool``
(``WarmPool``: engines prepared ahead), ``registry`` (``snapshot_for``) and ``kept``
(VMs a run left running on purpose).

May import: ``pytest_vmfork.build``, ``pytest_vmfork.net``, ``pytest_vmfork.host`` and
the bottom layer. Works without pytest.
"""
