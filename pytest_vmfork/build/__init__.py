"""The guest image: what goes into it and how it is built and cached.

``image`` (build one image, locked and staged; the public import path for the names
below), ``imagespec`` (the spec, its key, the built ``Image`` and its cache entry),
``debianroot`` (mmdebstrap's root per package set, shared by images), ``overlay`` (the
guest's file layout: agent, init files, shared modules, wheels), ``guestfiles`` (the
guest files found through the installed package), ``rootfs`` (mmdebstrap, the ext4
root), ``aptsources``, ``kernel`` (Debian's or a user's kernel, the initramfs),
``modtree`` (the kernel's module tree disk).

May import: ``pytest_vmfork.host`` and the bottom layer (errors, settings). Nothing
here starts a VM.
"""
