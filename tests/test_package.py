"""The package is ready for an index: the sdist and the wheel build, pass `twine check`
(the README renders as the long description) and carry the metadata users search by."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

from fixtures.checkout import build_lock
from tests.examples import README, REPO


def test_sdist_and_wheel_pass_twine_check_with_the_readme_as_long_description(tmp_path: Path) -> None:
    with build_lock():
        built = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(tmp_path),
                                str(REPO)], capture_output=True, text=True, timeout=900, check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    (sdist,) = tmp_path.glob("pytest_vmfork-*.tar.gz")
    (wheel,) = tmp_path.glob("pytest_vmfork-*.whl")

    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("PASSED") == 2, check.stdout

    with zipfile.ZipFile(wheel) as whl:
        (meta_name,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(whl.read(meta_name).decode())
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().strip() == README.read_text().strip()
    classifiers = meta.get_all("Classifier")
    assert {"Framework :: Pytest", "Operating System :: POSIX :: Linux",
            "Programming Language :: Python :: 3.11"} <= set(classifiers), classifiers
    assert meta["Requires-Python"] == ">=3.11"

    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    root = names[0].split("/")[0]
    for rel in ("README.md", "CHANGELOG.md", "docs/architecture.md", "docs/performance.md",
                "docs/security.md", "docs/bench.svg"):
        assert f"{root}/{rel}" in names, rel

    # Every file of guest/ (the agent's entry, its package vmfork_agent/, the init scripts)
    # ships in both, so the image builder finds the whole agent through the installed package.
    guest = {p.relative_to(REPO / "guest").as_posix() for p in (REPO / "guest").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts}
    assert {"agent.py", "vmfork_agent/server.py", "vmfork_agent/resume.py"} <= guest
    assert {f"{root}/guest/{rel}" for rel in guest} <= set(names)
    with zipfile.ZipFile(wheel) as whl:
        assert {f"pytest_vmfork/guest/{rel}" for rel in guest} <= set(whl.namelist())
