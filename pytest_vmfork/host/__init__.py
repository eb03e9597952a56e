"""Host resources: the directories, files and processes of this machine that a run owns.

Private directories and sealed files (``private``), run and VM directories (``run``),
the unprivileged QEMU user (``confine``), the cache's entries and their last use
(``cache``), and who owns a file by process identity (``procid``).

May import: the bottom layer (``pytest_vmfork.errors``, ``pytest_vmfork.config``) and
other modules of this package. Nothing here knows of VMs, networks or pytest.
"""
