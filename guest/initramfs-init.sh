#!/bin/sh
# PID 1 of the vmfork initramfs (installed as /init by pytest_vmfork/build/image.py).
#
# Its only job is to reach the real root: load the few kernel modules the
# Debian kernel ships as modules (virtio, ext4, overlay, ...), mount the
# read-only ext4 disk, put a tmpfs-backed overlay on top of it (so the disk
# image stays immutable and shared by every fork, and all writes live in
# guest RAM, which forks get copy-on-write) and switch_root into busybox init.
#
# On any failure it prints one clear line to the console and powers off, so
# the host sees "vmfork-initramfs: FAILED: ..." instead of a hung boot.
# Only busybox applets that image.py links into the initramfs are used here:
# sh mount umount mkdir insmod switch_root poweroff sleep cat uname.

PATH=/bin:/sbin
export PATH

fail() {
    echo "vmfork-initramfs: FAILED: $*"
    # Give the serial console a moment to drain before the machine is gone.
    sleep 0.2
    poweroff -f
    # poweroff -f does not return; if it somehow does, exiting PID 1 panics
    # the kernel and panic=-1 reboots (QEMU runs with -no-reboot, so it exits).
    exit 1
}

mount -t proc -o nosuid,nodev,noexec proc /proc || fail "mount /proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fail "mount /sys"
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || fail "mount devtmpfs on /dev"

# /etc/modules.order holds absolute .ko paths, dependencies first (computed
# at build time from the kernel's module dependency data).
while read -r ko; do
    [ -n "$ko" ] || continue
    insmod "$ko" || fail "insmod $ko"
done < /etc/modules.order

# virtio_blk probes synchronously, so /dev/vda normally exists already; the
# bounded wait only covers slow device setup (~10 s, boot path only).
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -le 100 ] || fail "root disk /dev/vda did not appear (is a virtio-blk-pci disk attached?)"
    sleep 0.1
done

mkdir -p /lower /rw /newroot || fail "mkdir mount points"
mount -t ext4 -o ro,noatime /dev/vda /lower || fail "mount /dev/vda (ext4, read-only) on /lower"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "mount tmpfs on /rw"
mkdir -p /rw/upper /rw/work || fail "mkdir /rw/upper /rw/work"
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "mount overlay on /newroot"

# The kernel's module tree, when the host attached it: a second read-only disk
# (squashfs, shared by every VM), mounted where modprobe looks for it. It is
# probed with /dev/vda (one driver, one synchronous probe), so no wait here.
if [ -b /dev/vdb ]; then
    modules="/newroot/lib/modules/$(uname -r)"
    mkdir -p "$modules" || fail "mkdir $modules"
    mount -t squashfs -o ro /dev/vdb "$modules" || fail "mount /dev/vdb (squashfs module tree) on $modules"
fi

for m in dev proc sys; do
    mount --move "/$m" "/newroot/$m" || fail "mount --move /$m /newroot/$m"
done

exec switch_root /newroot /sbin/init
fail "switch_root /newroot /sbin/init"
