"""VMs: the QEMU process, snapshots, forks and what a test does with a fork.

From the bottom of this layer up: ``qmploop`` and ``vmm`` (one QEMU process and its
channels), ``agent`` (the control channel's client), ``process`` and ``files`` (the
guest's processes and files), ``template``, ``accel``, ``migstream``, ``snapshot``
(boot, warm-up, save, verify), ``fork`` (the ``VM`` handle and the restore engine),
``layer`` (``vm.snapshot()``), ``pool`` (``WarmPool``), ``registry`` (``snapshot_for``)
and ``kept`` (VMs a run left running on purpose).

May import: ``pytest_vmfork.build``, ``pytest_vmfork.net``, ``pytest_vmfork.host`` and
the bottom layer. Works without pytest.
"""
