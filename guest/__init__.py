"""The guest side of pytest-vmfork, shipped inside the package as ``pytest_vmfork.guest``.

This directory is mapped to that package name (see pyproject.toml), so the image
builder finds these files through the installed package, never through a checkout:
the agent, the init scripts and the build-time helpers. Nothing here runs on the host.
"""
