"""Template validation and keys: bad recipes fail before anything boots."""

from pathlib import Path

import pytest

from pytest_vmfork import ConfigError, Template
from pytest_vmfork.build.image import KERNEL_CMDLINE
from pytest_vmfork.mailbox import MAX_MAILBOXES, MAX_TEMPLATE_MAILBOXES
from pytest_vmfork.vm.snapshot import ram_offset
from pytest_vmfork.vm.template import KERNEL_COMMAND_LINE_SIZE


def key(t: Template) -> str:
    return t.snapshot_key(accel="tcg", qemu_version="QEMU 7.2")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"memory_mib": 64}, "memory_mib=64: use an integer from 128"),
        ({"vcpus": 0}, "vcpus=0: use an integer from 1 to 16"),
        ({"kernel_flavour": "rt"}, "kernel_flavour='rt'"),
        ({"packages": "curl"}, "list of Debian package names"),
        ({"packages": ["-x"]}, "'-x' is not a Debian package name"),
        ({"files": {"relative/path": b"x"}}, "must be absolute"),
        ({"files": {"/a": 3}}, "must be bytes, str or Path"),
        ({"warmup": [[]]}, "non-empty argv"),
        ({"mailboxes": ["ok", "ok"]}, "duplicate names"),
        ({"mailboxes": ["bad name"]}, "invalid mailbox name 'bad name'"),
        ({"mailboxes": [f"m{i}" for i in range(65)]}, "65 declared, at most 64 per template"),
        ({"mailboxes": [f"{i:02d}" + "x" * 62 for i in range(30)]},
         "the 30 names take 1949 characters (vmfork.mailboxes=a,b,...) on the guest kernel command line"),
        ({"boot_timeout": 0}, "boot_timeout=0"),
    ],
)
def test_invalid_template_is_rejected_with_a_message_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Template(**kwargs)


def test_a_template_declares_up_to_64_mailboxes_and_they_ride_on_the_kernel_command_line():
    names = [f"box-{i:02d}" for i in range(MAX_TEMPLATE_MAILBOXES)]
    t = Template(mailboxes=names)
    assert t.mailboxes == tuple(names) and MAX_TEMPLATE_MAILBOXES == 64 and MAX_MAILBOXES == 16
    line = t.kernel_cmdline()
    assert line.endswith(" vmfork.mailboxes=" + ",".join(names)) and len(line) < KERNEL_COMMAND_LINE_SIZE
    assert Template().kernel_cmdline() == KERNEL_CMDLINE  # no mailboxes, no parameter


def test_the_longest_mailbox_list_that_fits_the_command_line_is_accepted_one_more_byte_is_not():
    room = KERNEL_COMMAND_LINE_SIZE - 1 - len(KERNEL_CMDLINE) - len(" vmfork.mailboxes=")
    names = ["n" * 64 for _ in range(room // 65)]
    names = [f"{i:02d}" + n[2:] for i, n in enumerate(names)]
    names.append("z" * (room - len(",".join(names)) - 1))  # the comma before it takes the last byte
    assert len(Template(mailboxes=names).kernel_cmdline()) == KERNEL_COMMAND_LINE_SIZE - 1  # + NUL: 2048
    with pytest.raises(ConfigError, match=f"which has room for {room}; use shorter names or fewer mailboxes"):
        Template(mailboxes=[*names[:-1], names[-1] + "z"])


def test_describe_names_what_tells_templates_apart():
    text = Template(memory_mib=512, packages=["jq"], files={"/etc/a": "x"}, mailboxes=["m"]).describe()
    assert text == "512 MiB, 1 vCPU, packages jq, files /etc/a, 1 mailbox"


def test_file_from_missing_host_path_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        Template(files={"/etc/x": tmp_path / "missing"})


def test_snapshot_key_changes_with_what_shapes_the_guest():
    base = key(Template())
    assert key(Template(memory_mib=512)) != base
    assert key(Template(warmup=["true"])) != base
    assert key(Template(mailboxes=["cfg"])) != base
    assert key(Template(packages=["curl"])) != base
    assert Template().snapshot_key(accel="kvm", qemu_version="QEMU 7.2") != base


def test_snapshot_key_ignores_what_does_not_shape_the_guest():
    assert key(Template(boot_timeout=5, warmup_timeout=7)) == key(Template())
    assert key(Template(packages=["bb", "aa"])) == key(Template(packages=["aa", "bb", "aa"]))


def test_string_warmup_runs_under_sh_and_files_normalise_to_bytes(tmp_path: Path):
    src = tmp_path / "f"
    src.write_text("from disk")
    t = Template(warmup=["echo hi"], files={"/a": "text", "/b": src})
    assert t.warmup == (("/bin/sh", "-c", "echo hi"),)
    assert t.files == {"/a": b"text", "/b": b"from disk"}


@pytest.mark.parametrize(
    ("gpa", "mem_mib", "offset"),
    [
        (0x1000, 256, 0x1000),
        (0x0FFFF000, 256, 0x0FFFF000),
        (0x7FFFF000, 4096, 0x7FFFF000),  # below the 2 GiB split
        (0x100000000, 4096, 0x80000000),  # first page above 4 GiB follows low RAM
    ],
)
def test_guest_physical_address_maps_to_ram_file_offset_on_q35(gpa, mem_mib, offset):
    assert ram_offset(gpa, mem_mib << 20) == offset


def test_address_outside_ram_is_an_error():
    from pytest_vmfork import BuildError

    with pytest.raises(BuildError, match="outside guest RAM"):
        ram_offset(0xFEE00000, 256 << 20)
