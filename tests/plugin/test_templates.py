"""Several templates in one run (real VMs, inner pytest runs with -n 2).

Two templates that a guest can tell apart (fixtures.templates): PLAIN_TEMPLATE
has /etc/app.conf "mode = plain", no jq and 64 mailboxes with long names (a
2015-byte kernel command line); JSON_TEMPLATE has jq and "mode = json". They
are chosen per directory, module, class and test. The inner run uses
``--dist each``, so both xdist workers need both templates at the same time: the
store's per-key lock must still boot each once. Its snapshot cache is private
(the images are linked from the shared cache), so that happens in every run of
this test, not only on a cold cache; a second run then finds both cached.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from fixtures.templates import JSON_TEMPLATE, PLAIN_TEMPLATE
from pytest_vmfork.build import image
from pytest_vmfork.plugin import SESSION_KEY
from pytest_vmfork.vm.accel import resolve_accel
from pytest_vmfork.vm.snapshot import SnapshotStore
from tests.examples import example_files

from .suites import REPO, finish

RUN_TIMEOUT = 420.0  # an inner run: two template boots (TCG, a loaded machine) and ~30 forks

SUITE = {
    "pytest.ini": "[pytest]\n",
    "conftest.py": f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, __file__.rsplit("/", 1)[0]]
        import pytest
        from looks import look

        @pytest.fixture(scope="session")
        def seen():
            return look
        """,
    "looks.py": """
        PLAIN = "mode = plain\\njq=no\\n"
        JSON = "mode = json\\njq=yes\\n"

        def look(vm):
            \"\"\"What tells the templates apart, read in the guest: a file's content and a package.\"\"\"
            return vm.exec("cat /etc/app.conf; command -v jq >/dev/null && echo jq=yes || echo jq=no").stdout.decode()
        """,
    "plain/conftest.py": """
        import pytest
        from fixtures.templates import PLAIN_TEMPLATE

        @pytest.fixture(scope="session")
        def vmfork_template():
            return PLAIN_TEMPLATE
        """,
    "plain/test_plain.py": """
        import pytest
        from looks import JSON, PLAIN
        from fixtures.templates import JSON_TEMPLATE, PLAIN_TEMPLATE
        from pytest_vmfork import ConfigError

        def test_the_directory_template(vm, vmfork_snapshot, vmfork_snapshots, seen):
            assert seen(vm) == PLAIN
            assert vm.forked_from is vmfork_snapshot is vmfork_snapshots(PLAIN_TEMPLATE)
            assert len(vmfork_snapshot.mailboxes) == 64

        @pytest.mark.parametrize("i", range(2))
        def test_vm_factory_forks_the_template_it_is_given(vm_factory, vmfork_snapshots, seen, i):
            # alternating, so that each snapshot's warm pool is offered forks of the other
            for _ in range(2):
                assert seen(vm_factory()) == PLAIN
                other = vm_factory(template=JSON_TEMPLATE)
                assert seen(other) == JSON and other.forked_from is vmfork_snapshots(JSON_TEMPLATE)
            assert seen(vm_factory(snapshot=vmfork_snapshots(JSON_TEMPLATE))) == JSON

        def test_template_and_snapshot_together_are_refused(vm_factory, vmfork_snapshot):
            with pytest.raises(ConfigError, match="^vm_factory: give template= or snapshot=, not both$"):
                vm_factory(template=PLAIN_TEMPLATE, snapshot=vmfork_snapshot)

        def test_sixteen_mailboxes_reach_one_fork_and_seventeen_are_refused(vm_factory, vmfork_snapshot):
            names = list(vmfork_snapshot.mailboxes)
            vm = vm_factory(mailboxes={n: {"box": n} for n in names[:16]})
            listing = vm.exec("cd /run/vmfork/mailbox && for f in box*.json; do echo \\"$f $(cat $f)\\"; done")
            assert listing.stdout.decode().splitlines() == [f'{n}.json {{"box":"{n}"}}' for n in names[:16]]
            for at in range(16, 64, 16):  # all 64 work, 16 at a time
                rest = vm_factory(mailboxes={n: {"box": n} for n in names[at:at + 16]})
                assert [rest.read_mailbox(n) for n in names[at:at + 16]] == [{"box": n} for n in names[at:at + 16]]
            with pytest.raises(ConfigError, match="^17 mailboxes requested for one fork; at most 16 are allowed$"):
                vm_factory(mailboxes={n: {"box": n} for n in names[:17]})

        class TestAClassOverride:
            @pytest.fixture(scope="class")
            @classmethod
            def vmfork_template(cls):
                return JSON_TEMPLATE

            def test_the_class_template_beats_the_directory_one(self, vm, vmfork_snapshot, seen):
                assert seen(vm) == JSON and vmfork_snapshot.mailboxes == ()

        def test_after_the_class_the_directory_template_again(vm, seen):
            assert seen(vm) == PLAIN
        """,
    "plain/test_module_override.py": """
        import pytest
        from looks import JSON
        from fixtures.templates import JSON_TEMPLATE

        @pytest.fixture(scope="module")
        def vmfork_template():
            return JSON_TEMPLATE

        def test_the_module_template_beats_the_directory_one(vm, seen):
            assert seen(vm) == JSON
        """,
    "json/conftest.py": """
        import pytest
        from fixtures.templates import JSON_TEMPLATE

        @pytest.fixture(scope="session")
        def vmfork_template():
            return JSON_TEMPLATE
        """,
    "json/test_json.py": """
        import pytest
        from looks import JSON, PLAIN
        from fixtures.templates import PLAIN_TEMPLATE
        from pytest_vmfork import Template

        @pytest.fixture(scope="session")
        def plain_snapshot(vmfork_snapshots):  # a session-scoped user fixture cannot use vmfork_snapshot
            return vmfork_snapshots(PLAIN_TEMPLATE)

        def test_the_directory_template(vm, vmfork_snapshot, seen):
            assert seen(vm) == JSON and vmfork_snapshot.mailboxes == ()

        def test_a_session_fixture_gets_another_template_s_snapshot(plain_snapshot, vm_factory, seen):
            assert seen(vm_factory(snapshot=plain_snapshot)) == PLAIN
            assert seen(vm_factory()) == JSON

        class TestAFunctionScopedOverride:
            @pytest.fixture
            def vmfork_template(self):  # a new Template object per test, equal to PLAIN_TEMPLATE
                return Template(files={"/etc/app.conf": "mode = plain\\n"}, mailboxes=list(PLAIN_TEMPLATE.mailboxes))

            @pytest.mark.parametrize("i", range(2))
            def test_an_equal_template_shares_the_snapshot(self, vm, vmfork_snapshot, plain_snapshot, seen, i):
                assert seen(vm) == PLAIN and vmfork_snapshot is plain_snapshot
        """,
}
INNER_TESTS = 12  # per worker; --dist each runs every test on both
#: forks per worker. plain: directory 1 + vm_factory() 2*2 + mailboxes 4 + after the class 1
#: + session fixture 1 + function-scoped override 2; json: vm_factory(template=/snapshot=) 2*3
#: + class 1 + module 1 + directory 1 + vm_factory() in json/ 1
FORKS = {"plain": 13, "json": 10}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # image files are only ever read
    except OSError:
        shutil.copy2(src, dst)


@pytest.fixture
def private_cache(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, object]:
    """A snapshot cache of its own with the two templates' images (built in, and
    linked from, the shared cache) and the shared KVM verdict; their snapshot keys."""
    settings = request.config.stash[SESSION_KEY].settings
    shared, cache = settings.cache_dir, tmp_path / "cache"
    keys = {}
    for label, template in (("plain", PLAIN_TEMPLATE), ("json", JSON_TEMPLATE)):
        img = image.build_image(template.image_spec(), shared)  # cached across runs; locked
        target = cache / "images" / img.key
        if not target.exists():
            target.mkdir(parents=True)
            for f in img.dir.iterdir():
                _link_or_copy(f, target / f.name)
        accel = resolve_accel(settings.accel, shared, template, lambda message: None)
        keys[label] = SnapshotStore(cache, accel=accel).key_for(template)
    if (shared / "probes").is_dir():
        shutil.copytree(shared / "probes", cache / "probes")
    return {"dir": cache, "keys": keys}


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="vmfk-", dir="/tmp"))  # QEMU's socket paths are short
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def write_suite(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))


def inner_env(tmp: Path, **extra: str) -> dict[str, str]:
    """As for a pytest started by hand: nothing of the outer xdist worker."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "VMFORK_NETWORK")) and k != "PYTHONPATH"}
    env.update(TMPDIR=str(tmp), PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def run_inner(root: Path, tmp: Path, *args: str, timeout: float = RUN_TIMEOUT, **env: str) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", *args]
    proc = subprocess.Popen(cmd, cwd=root, env=inner_env(tmp, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return finish(proc, timeout)


def summary_of(out: str, key: str) -> list[str]:
    """The summary's lines about one snapshot: its status, template and forks."""
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"snapshot {key}: "))
    return lines[at:at + 3]


def test_each_directory_module_and_class_forks_its_own_template_each_booted_once(
    tmp_path: Path, private_cache, short_tmp: Path
):
    suite = tmp_path / "suite"
    write_suite(suite, SUITE)
    cache, keys = private_cache["dir"], private_cache["keys"]
    assert keys["plain"] != keys["json"]

    code, out = run_inner(suite, short_tmp, "-n", "2", "--dist", "each", "--vmfork-network=none",
                          VMFORK_CACHE_DIR=str(cache))
    assert code == 0 and f"{2 * INNER_TESTS} passed" in out, out[-6000:]
    assert sorted(p.name for p in (cache / "snapshots").iterdir() if p.is_dir()) == sorted(keys.values())
    run_ids = set()
    for label, key in keys.items():
        status, template, forks = summary_of(out, key)
        assert status.startswith(f"snapshot {key}: built in ") and "booted by" not in status, out[-6000:]
        assert out.count(f"vmfork: snapshot {key} ready") == 1, out[-6000:]  # one boot, two workers
        described = (PLAIN_TEMPLATE if label == "plain" else JSON_TEMPLATE).describe()
        assert template == f"  template: {described}"
        assert re.fullmatch(rf"  {2 * FORKS[label]} forks, restore-to-healthy p50 \d+ ms, p95 \d+ ms", forks), out
        run_ids.add(json.loads((cache / "snapshots" / key / "manifest.json").read_text())["run_id"])
    assert len(run_ids) == 1
    assert f"forks: {2 * sum(FORKS.values())}  restore-to-healthy" in out

    # The next run finds both in the cache and boots nothing.
    code, out = run_inner(suite, short_tmp, "-n", "2", "--vmfork-network=none", "json",
                          VMFORK_CACHE_DIR=str(cache))
    assert code == 0 and "4 passed" in out, out[-6000:]
    for key in keys.values():
        assert summary_of(out, key)[0] == f"snapshot {key}: cache hit (no template boot)", out[-6000:]
    assert "booting template" not in out


# --- docs/guide.md: "Several templates in one run", run exactly as written ---------------


def test_the_documented_several_templates_example_passes(tmp_path: Path, short_tmp: Path):
    files = example_files("several-templates")
    assert "json/conftest.py" in files and "conftest.py" in files
    write_suite(tmp_path, files)
    code, out = run_inner(tmp_path, short_tmp, "-n", "2")
    assert code == 0 and f"{sum(t.count('def test_') for t in files.values())} passed" in out, out[-6000:]
    assert len(re.findall(r"^snapshot \w+: ", out, re.M)) == 2, out[-6000:]


def test_the_documented_snapshot_for_script_prints_what_the_fork_computed(tmp_path: Path, short_tmp: Path):
    files = example_files("snapshot-for")
    write_suite(tmp_path, files)
    proc = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, env=inner_env(short_tmp),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert proc.returncode == 0 and proc.stdout == "2\n", proc.stdout + proc.stderr[-3000:]
    assert not list((short_tmp / f"vmfork-{os.getuid()}").glob("*/f*")), "a fork's directory was left"


def test_a_template_this_run_never_used_is_not_in_the_summary(tmp_path: Path, short_tmp: Path):
    """A test that forks only vm_factory(template=...) never boots the default template."""
    write_suite(tmp_path, {
        "conftest.py": f"""
            import sys
            sys.path.insert(0, {str(REPO)!r})
            """,
        "test_only_json.py": """
            from fixtures.templates import JSON_TEMPLATE

            def test_json_only(vm_factory):
                assert vm_factory(template=JSON_TEMPLATE).exec("jq -n 1+1").stdout == b"2\\n"
            """,
    })
    code, out = run_inner(tmp_path, short_tmp, "--vmfork-network=none")
    assert code == 0 and "1 passed" in out, out[-6000:]
    assert re.findall(r"^  template: .*$", out, re.M) == [f"  template: {JSON_TEMPLATE.describe()}"], out[-6000:]
