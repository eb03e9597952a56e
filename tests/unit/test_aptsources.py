"""Unit tests for pytest_vmfork.build.aptsources: which Debian sources the guest is built from."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_vmfork.build import aptsources
from pytest_vmfork.errors import ConfigError

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def write_etc(tmp_path: Path, sources_list: str = "", **parts: str) -> Path:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text(sources_list)
    for name, text in parts.items():
        (etc / "sources.list.d" / name.replace("__", ".")).write_text(text)
    return etc


def test_deb822_entries_become_one_line_entries_for_the_guest_release_only(tmp_path: Path) -> None:
    etc = write_etc(tmp_path, debian__sources=f"""\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: {KEYRING}

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Enabled: no
""", nodesource__sources="""\
Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
""")
    assert aptsources.host_entries(etc) == [
        f"deb [signed-by={KEYRING}] http://deb.debian.org/debian bookworm main contrib",
        f"deb [signed-by={KEYRING}] http://deb.debian.org/debian bookworm-updates main contrib",
    ]


def test_one_line_entries_keep_options_and_drop_comments_deb_src_and_other_suites(tmp_path: Path) -> None:
    etc = write_etc(tmp_path, "\n".join([
        "# a comment",
        "deb [arch=amd64] http://mirror.example/debian bookworm main  # trailing",
        "deb-src http://mirror.example/debian bookworm main",
        "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main",
        "deb http://archive.ubuntu.com/ubuntu jammy main",
    ]))
    assert aptsources.host_entries(etc) == ["deb [arch=amd64] http://mirror.example/debian bookworm main"]


def test_an_inline_key_paragraph_is_skipped(tmp_path: Path) -> None:
    etc = write_etc(tmp_path, x__sources="Types: deb\nURIs: http://m/debian\nSuites: bookworm\n"
                                        "Components: main\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n")
    assert aptsources.host_entries(etc) == []


def test_a_host_without_guest_sources_is_told_which_option_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aptsources, "host_entries", lambda: [])
    with pytest.raises(ConfigError, match=r"no bookworm entries.*--vmfork-apt-sources.*deb http://deb.debian.org"):
        aptsources.resolve(None)


def test_the_setting_takes_mirrors_lines_and_files_and_overrides_the_host(tmp_path: Path) -> None:
    listing = tmp_path / "guest.list"
    listing.write_text("deb http://m/debian bookworm main\n")
    config = aptsources.resolve(f"http://deb.debian.org/debian; deb http://m/debian bookworm-updates main\n{listing}")
    assert config.sources == ("http://deb.debian.org/debian", "deb http://m/debian bookworm-updates main",
                              str(listing))
    assert config.origin == "vmfork_apt_sources"


@pytest.mark.parametrize("value", ["", " ; ", "not a source", "/no/such/file.list"])
def test_a_bad_setting_names_the_item_and_an_example(value: str) -> None:
    with pytest.raises(ConfigError, match="vmfork_apt_sources"):
        aptsources.parse_setting(value)


def test_only_reachability_options_are_carried_from_the_host() -> None:
    carried = [line for line in [
        'Acquire::http::Proxy "http://proxy:3142";', 'Acquire::Check-Valid-Until "false";',
        'APT::Update::Post-Invoke-Success "rm -rf /";', 'DPkg::Post-Invoke "x";', 'Acquire::cdrom "";',
    ] if aptsources.CARRIED_OPTIONS.match(line)]
    assert carried == ['Acquire::http::Proxy "http://proxy:3142";', 'Acquire::Check-Valid-Until "false";']
