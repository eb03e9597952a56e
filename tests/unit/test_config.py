"""Options: every knob is a --vmfork-* flag and an ini key; precedence and errors."""

from pathlib import Path

import pytest

from pytest_vmfork import ConfigError
from pytest_vmfork.plugin.options import OPTIONS, resolve_settings


def resolve(cli=None, ini=None, monkeypatch=None):
    cli, ini = cli or {}, ini or {}
    return resolve_settings(lambda n: cli.get(n), lambda n: ini.get(n))


def test_environment_beats_ini_for_the_cache_dir(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("VMFORK_CACHE_DIR", str(tmp_path / "env"))
    assert resolve(ini={"vmfork_cache_dir": str(tmp_path / "ini")}).cache_dir == tmp_path / "env"


def test_defaults():
    s = resolve()
    assert (s.accel, s.rebuild, s.keep_failed, s.ready_timeout) == ("auto", False, False, 30.0)


def test_command_line_beats_ini_and_falsy_values_still_win():
    s = resolve(cli={"vmfork_accel": "tcg", "vmfork_ready_timeout": "5"},
                ini={"vmfork_accel": "kvm", "vmfork_ready_timeout": "9", "vmfork_rebuild": "false"})
    assert (s.accel, s.ready_timeout, s.rebuild) == ("tcg", 5.0, False)


def test_ini_values_are_parsed(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("VMFORK_CACHE_DIR", raising=False)
    s = resolve(ini={"vmfork_cache_dir": str(tmp_path), "vmfork_keep_failed": "yes"})
    assert s.cache_dir == tmp_path and s.keep_failed is True


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        ({"vmfork_accel": "xen"}, "'xen' is not one of auto, tcg, kvm"),
        ({"vmfork_ready_timeout": "soon"}, "use a number of seconds"),
        ({"vmfork_ready_timeout": "-1"}, "greater than 0"),
    ],
)
def test_bad_values_name_the_option_and_the_fix(cli, message):
    with pytest.raises(ConfigError, match=message):
        resolve(cli=cli)


def test_bad_boolean_in_ini_is_an_error():
    with pytest.raises(ConfigError, match="vmfork_rebuild='maybe': use true or false"):
        resolve(ini={"vmfork_rebuild": "maybe"})


def test_every_option_has_a_flag_named_after_its_ini_key():
    for opt in OPTIONS:
        assert opt.flag == "--" + opt.name.replace("_", "-") and opt.flag.startswith("--vmfork-")
