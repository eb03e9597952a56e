"""The janitor: finds what dead runs left (QEMU processes, directories, TAPs, bridges,
leases, kept VMs) and removes only what provably belongs to a run that is gone.

A janitor has to know every layer's leftovers, so it sits above the library and below
the two entry points that call it (the pytest plugin at session start, ``vmfork gc``).

May import: ``pytest_vmfork.vm``, ``pytest_vmfork.net``, ``pytest_vmfork.host``,
``pytest_vmfork.build`` and the bottom layer. Never the plugin or the CLI.
"""
