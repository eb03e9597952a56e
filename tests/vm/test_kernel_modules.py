"""The guest kernel's module tree in real forks: modprobe, on-demand loading, modules=.

Networking inside the guest only (network namespaces of the fork): nothing leaves it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import pytest

from fixtures.kernels import NFT_TEMPLATE
from fixtures.templates import TEST_TEMPLATE
from pytest_vmfork import ConfigError, Template, snapshot_for
from pytest_vmfork.build.image import build_image, cached_image
from pytest_vmfork.config import default_cache_dir

pytestmark = pytest.mark.vm

#: Two network namespaces joined by a veth pair, 10.9.0.1 <-> 10.9.0.2 (guest-internal).
VETH_NAMESPACES = """
set -e
ip netns add a; ip netns add b
ip link add va type veth peer name vb
ip link set va netns a; ip link set vb netns b
ip -n a addr add 10.9.0.1/24 dev va; ip -n b addr add 10.9.0.2/24 dev vb
ip -n a link set va up; ip -n b link set vb up; ip -n a link set lo up; ip -n b link set lo up
"""
PING_B = "ip netns exec a busybox ping -c 1 -W 2 10.9.0.2"


def _cache() -> Path:
    return Path(os.environ.get("VMFORK_CACHE_DIR") or default_cache_dir())


def _ok(vm, script: str) -> str:
    res = vm.exec(script)
    assert res.returncode == 0, (script, res.stdout, res.stderr)
    return res.stdout.decode()


def test_module_tree_is_mounted_read_only_at_lib_modules_of_the_running_kernel(vm):
    release = _ok(vm, "uname -r").strip()
    mount = _ok(vm, f"grep ' /usr/lib/modules/{release} ' /proc/mounts")
    assert mount.startswith("/dev/vdb ") and " squashfs ro," in mount
    assert _ok(vm, "modinfo -n veth").strip().endswith("/drivers/net/veth.ko")


def test_kernel_loads_veth_on_demand_and_the_pair_pings_across_namespaces(vm):
    assert "veth" not in _ok(vm, "lsmod")
    _ok(vm, VETH_NAMESPACES)  # `ip link add type veth` makes the kernel run modprobe itself
    assert "veth" in _ok(vm, "lsmod")
    assert "1 packets received" in _ok(vm, PING_B)


def test_bridge_module_joins_two_veths_and_forwards_between_namespaces(vm):
    _ok(vm, """
set -e
modprobe bridge
ip netns add a; ip netns add b
ip link add br0 type bridge; ip link set br0 up
for n in a b; do
  ip link add h$n type veth peer name p$n
  ip link set p$n netns $n; ip link set h$n master br0; ip link set h$n up
  ip -n $n link set p$n up
done
ip -n a addr add 10.9.1.1/24 dev pa; ip -n b addr add 10.9.1.2/24 dev pb
""")
    assert "bridge" in _ok(vm, "lsmod")
    assert "master br0" in _ok(vm, "ip link show ha")
    assert "1 packets received" in _ok(vm, "ip netns exec a busybox ping -c 1 -W 2 10.9.1.2")


def test_modprobe_of_a_missing_module_fails_with_modprobes_own_message(vm):
    res = vm.exec("modprobe no_such_module_here")
    assert res.returncode != 0 and b"not found in directory /lib/modules/" in res.stderr


class TestTemplateModules:
    """NFT_TEMPLATE: modules=["veth", "nf_tables"] and the nftables package."""

    @pytest.fixture(scope="class")
    @classmethod
    def vmfork_template(cls) -> Template:
        return NFT_TEMPLATE

    def test_template_modules_are_loaded_in_the_snapshot(self, vm, vmfork_snapshot):
        assert {"veth", "nf_tables"} <= {line.split()[0] for line in _ok(vm, "lsmod").splitlines()[1:]}
        assert vmfork_snapshot.manifest["image_key"] == cached_image(NFT_TEMPLATE.image_spec(), _cache()).key

    def test_an_nftables_rule_drops_the_ping_and_deleting_it_lets_it_through(self, vm):
        _ok(vm, VETH_NAMESPACES)
        assert "1 packets received" in _ok(vm, PING_B)
        _ok(vm, "ip netns exec b nft add table inet f && "
                "ip netns exec b nft add chain inet f in '{ type filter hook input priority 0; }' && "
                "ip netns exec b nft add rule inet f in icmp type echo-request drop")
        assert "nf_tables" in _ok(vm, "lsmod")
        res = vm.exec(PING_B)
        assert res.returncode != 0 and b"0 packets received" in res.stdout
        _ok(vm, "ip netns exec b nft delete table inet f")
        assert "1 packets received" in _ok(vm, PING_B)


def test_unknown_module_is_a_config_error_naming_it_before_any_boot():
    said: list[str] = []
    with pytest.raises(ConfigError, match=r"no module 'vethh'; did you mean 'veth'\?"):
        snapshot_for(Template(modules=["vethh", "bridge"]), cache_dir=_cache(), progress=said.append)
    assert not [line for line in said if "booting template" in line]


def test_two_templates_of_one_kernel_share_one_module_tree_built_once():
    cache = _cache()
    a = build_image(TEST_TEMPLATE.image_spec(), cache)
    b = build_image(NFT_TEMPLATE.image_spec(), cache)
    assert a.manifest["root_key"] != b.manifest["root_key"]  # two package sets, two Debian roots
    assert a.modules is not None and a.modules.key == b.modules.key == a.manifest["modules_key"]
    roots = [json.loads((cache / "roots" / img.manifest["root_key"] / "root.json").read_text()) for img in (a, b)]
    assert not all(r["kernel"]["modules_built"] for r in roots)  # the second root found it in the cache
    assert a.modules.names >= {"veth", "bridge", "nf_tables", "8021q", "wireguard", "dummy", "vxlan", "tun"}


def test_a_moved_cache_still_hits_its_images_module_tree(tmp_path):
    cache = _cache()
    img = build_image(TEST_TEMPLATE.image_spec(), cache)
    assert img.modules is not None
    # A copy (hard links where the filesystem allows) of just this image's entries, then a move.
    first = cache.parent / f".vmfork-moved-{secrets.token_hex(4)}"
    moved = cache.parent / f".vmfork-moved-{secrets.token_hex(4)}"
    try:
        for rel in (f"images/{img.key}", f"roots/{img.manifest['root_key']}", f"modules/{img.modules.key}"):
            shutil.copytree(cache / rel, first / rel, copy_function=_link_or_copy)
        os.rename(first, moved)
        said: list[str] = []
        again = build_image(TEST_TEMPLATE.image_spec(), moved, progress=said.append)
        assert said == []  # nothing built, nothing rebuilt
        assert again.modules is not None and again.modules.image == moved / "modules" / img.modules.key / "modules.sqfs"
        assert again.rootfs == moved / "images" / img.key / "rootfs.img"
    finally:
        shutil.rmtree(first, ignore_errors=True)
        shutil.rmtree(moved, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
