"""The janitor: finds what dead runs left (QEMU processes, directories, TAPs, bridges,
leases, kept VMs, partial builds, stale cache entries) and removes only what provably
belongs to a run that is gone, or (pruning) what no live process uses.

A janitor has to know every layer's leftovers, so it sits above the library and below
the two entry points that call it (the pytest plugin at session start, ``vmfork gc``
and ``vmfork cache prune``).

- ``gc``: the entry points :func:`~pytest_vmfork.janitor.gc.collect` and
  :func:`~pytest_vmfork.janitor.gc.gc_at_session_start`, running the phases below;
- ``report``: what a gc pass removed or skipped (``GcItem``, ``GcReport``);
- ``sweep``: the context the phases share (settings, budget, what earlier phases found);
- ``processes``: orphan QEMU processes; ``runs``: run and VM directories;
  ``kept``: kept VMs (``--kept`` only); ``leases``: stale subnet leases, reclaims and
  per-run lease directories; ``links``: TAPs and bridges; ``partials``: partial builds
  in the cache;
- ``prune``: cache entries no live process uses, by age, size cap or missing dependency.

May import: ``pytest_vmfork.vm``, ``pytest_vmfork.net``, ``pytest_vmfork.host``,
``pytest_vmfork.build`` and the bottom layer. Never the plugin or the CLI.
"""
