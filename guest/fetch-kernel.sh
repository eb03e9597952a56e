#!/bin/sh
# fetch-kernel.sh FLAVOUR: runs inside the guest root while mmdebstrap builds it
# (a --customize-hook, chroot'ed), so the kernel comes from the guest's own apt
# sources whatever the host's distribution is. It only downloads the kernel
# package (no maintainer scripts, no initramfs-tools, no modules in the root):
# the host unpacks the .deb and builds the initramfs itself.
# Leaves /tmp/vmfork-kernel/{kernel.deb,info}; the host copies them out.
set -eu
flavour="$1"
meta="linux-image-$flavour"
pkg=$(apt-cache depends "$meta" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ <>]*\)$/\1/p' | head -n 1)
if [ -z "$pkg" ]; then
    echo "vmfork: $meta names no kernel package in the guest's apt sources" >&2
    exit 1
fi
# The same kernel without the secure-boot wrapper package, where it exists.
if apt-cache show --no-all-versions "$pkg-unsigned" >/dev/null 2>&1; then
    pkg="$pkg-unsigned"
fi
mkdir -p /tmp/vmfork-kernel
cd /tmp/vmfork-kernel
apt-get download -q=2 -o APT::Sandbox::User=root "$pkg"
mv ./*.deb kernel.deb
version=$(apt-cache show --no-all-versions "$pkg" | sed -n 's/^Version: //p' | head -n 1)
echo "$pkg $version" > info
