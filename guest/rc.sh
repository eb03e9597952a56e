#!/bin/sh
# System setup for the vmfork guest, run once by busybox init (::sysinit) in
# the real root, before the agent starts. Installed as /etc/vmfork/rc.sh.
#
# The root is an overlay (read-only ext4 disk + tmpfs upper) prepared by the
# initramfs, which also moved /dev, /proc and /sys here. Failures are reported
# but do not stop the boot: the agent is what reports health to the host.

warn() { echo "vmfork-rc: WARNING: $*"; }

mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run || warn "mount /run"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp || warn "mount /tmp"
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,mode=0620,ptmxmode=0666 devpts /dev/pts || warn "mount /dev/pts"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm || warn "mount /dev/shm"

hostname -F /etc/hostname || warn "hostname"

# The mailbox pages are mlock()ed and shared with the host by address:
# compaction must never migrate them, and THP must not merge them.
echo 0 > /proc/sys/vm/compact_unevictable_allowed || warn "compact_unevictable_allowed"
echo never > /sys/kernel/mm/transparent_hugepage/enabled || warn "transparent_hugepage"

# Without a module tree (a user's kernel with everything built in) fail module
# autoload at once instead of forking a modprobe that can only fail (forks are
# slow under TCG); with one (the initramfs mounted it) the kernel's on-demand
# loading runs modprobe as usual.
[ -e "/lib/modules/$(uname -r)/modules.dep" ] || echo > /proc/sys/kernel/modprobe || warn "kernel.modprobe"

mkdir -p /run/vmfork/mailbox || warn "mkdir /run/vmfork/mailbox"
ip link set lo up || warn "ip link set lo up"
