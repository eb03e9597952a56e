"""Building a guest: Debian root (mmdebstrap), ext4 image, kernel, initramfs, module tree.

``aptsources`` (which Debian), ``rootfs`` (the root tree), ``kernel`` (kernel and
initramfs), ``modtree`` (the kernel's modules as a squashfs), ``guestfiles`` (the agent
and init scripts the package ships), ``image`` (all of it as one cached, content-keyed
image).

May import: ``pytest_vmfork.host`` and the bottom layer. Nothing here runs QEMU.
"""
