"""The ``vmfork`` command: build the image and snapshot, or fork a VM by hand.

    vmfork build [--template pkg.module:NAME] [--rebuild]
    vmfork run [--template ...] -- uname -a
    vmfork key [--template ...]
    vmfork kept [--cache-dir D]
    vmfork exec NAME -- cat /tmp/what-the-failed-test-wrote
    vmfork shell NAME
    vmfork cache [prune [--older-than 30d] [--max-size 10G] [--dry-run]] [--cache-dir D]
    vmfork gc [--dry-run] [--kept] [--orphan-links] [--lease-dir D] [--cache-dir D]
    vmfork doctor [--template pkg.module:NAME] [--cache-dir D]

This package: the commands (here), ``doctor`` (what this host can run) and ``shell``
(an interactive shell in a kept VM).

May import: every library layer (``vm``, ``build``, ``net``, ``host``, the janitor) and
the bottom layer. Never the pytest plugin, and nothing below imports this.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from pytest_vmfork.build.aptsources import parse_setting
from pytest_vmfork.build.image import BuildOptions
from pytest_vmfork.build.rootfs import MODES
from pytest_vmfork.config import ACCELS, default_cache_dir
from pytest_vmfork.errors import ConfigError, VMForkError
from pytest_vmfork.host import private
from pytest_vmfork.host.run import Run
from pytest_vmfork.vm.accel import resolve_accel
from pytest_vmfork.vm.fork import fork
from pytest_vmfork.vm.snapshot import Snapshot, SnapshotStore
from pytest_vmfork.vm.template import Template


def load_template(spec: str | None) -> Template:
    """``module:attr`` naming a Template, a zero-argument callable returning one, or a
    ``vmfork_template`` fixture without arguments (``conftest:vmfork_template``)."""
    if not spec:
        return Template()
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ConfigError(f"--template {spec!r}: use the form package.module:NAME")
    sys.path.insert(0, ".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--template {spec!r}: {exc}") from exc
    # A conftest's `vmfork_template` fixture is fine too: call the function it wraps.
    obj = getattr(obj, "_get_wrapped_function", lambda: obj)()
    try:
        template = obj() if callable(obj) and not isinstance(obj, Template) else obj
    except TypeError as exc:
        raise ConfigError(f"--template {spec!r} must take no arguments: {exc}") from exc
    if not isinstance(template, Template):
        raise ConfigError(f"--template {spec!r} is a {type(template).__name__}, not a pytest_vmfork.Template")
    return template


def _build_options(args: argparse.Namespace) -> BuildOptions:
    if args.apt_sources:
        parse_setting(args.apt_sources)  # ConfigError naming the bad item, before anything runs
    return BuildOptions(apt_sources=args.apt_sources, mode=args.build_mode)


def _snapshot(args: argparse.Namespace, run: Run) -> Snapshot:
    template = load_template(args.template)
    progress = print
    private.private_dir(args.cache_dir, "cache directory")
    build = _build_options(args)
    accel = resolve_accel(args.accel, args.cache_dir, template, progress, build, verbose=True)
    store = SnapshotStore(args.cache_dir, accel=accel, progress=progress, build=build)
    return store.get(template, run=run, rebuild=getattr(args, "rebuild", False))


def cmd_build(args: argparse.Namespace) -> int:
    run = Run(qemu_user=args.qemu_user)
    try:
        t0 = time.monotonic()
        snap = _snapshot(args, run)
        state = "cache hit" if snap.cache_hit else f"built in {snap.build_s:.1f}s"
        print(f"snapshot {snap.key}: {state} ({time.monotonic() - t0:.1f}s)\n  {snap.dir}")
    finally:
        run.remove()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if not args.argv:
        raise ConfigError("vmfork run needs a command after --, e.g. vmfork run -- uname -a")
    run = Run(qemu_user=args.qemu_user)
    try:
        snap = _snapshot(args, run)
        with fork(snap, run=run) as vm:
            res = vm.exec(args.argv, timeout=args.timeout)
            sys.stdout.buffer.write(res.stdout)
            sys.stderr.buffer.write(res.stderr)
            print(f"[vmfork] {vm.name}: restore-to-healthy {vm.timings['restore_to_healthy_ms']:.0f} ms",
                  file=sys.stderr)
            return res.returncode
    finally:
        run.remove()


def _to_stderr(message: str) -> None:
    """Progress of a command whose stdout is the guest program's."""
    print(message, file=sys.stderr)


def cmd_key(args: argparse.Namespace) -> int:
    """Print the template's image key: what a CI cache of the image and snapshot is keyed on."""
    template = load_template(args.template)
    print(template.image_spec().key())
    return 0


def cmd_kept(args: argparse.Namespace) -> int:
    """List the VMs --vmfork-keep-failed saved: name, test id, when, size on disk."""
    from pytest_vmfork.vm.kept import list_kept

    kept = list_kept(args.cache_dir)
    if not kept:
        print(f"no kept VMs in {args.cache_dir} (pytest --vmfork-keep-failed keeps failed tests' VMs)")
        return 0
    rows = [(k.name, k.test, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(k.created)),
             f"{k.disk_bytes / 2**20:.0f} MiB") for k in kept]
    widths = [max(len(r[i]) for r in [("NAME", "TEST", "SAVED", "SIZE"), *rows]) for i in range(4)]
    for row in [("NAME", "TEST", "SAVED", "SIZE"), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    """Fork a kept VM, run one command in it, tear the fork down (the kept snapshot stays)."""
    from pytest_vmfork.vm.kept import find_kept

    if not args.argv:
        raise ConfigError(f"vmfork exec needs a command after --, e.g. vmfork exec {args.name} -- ls /root")
    run = Run(qemu_user=args.qemu_user)
    try:
        snap = find_kept(args.cache_dir, args.name, ram_gid=run.qemu(_to_stderr).ram_gid)
        with fork(snap, run=run) as vm:
            res = vm.exec(args.argv, timeout=args.timeout)
            sys.stdout.buffer.write(res.stdout)
            sys.stderr.buffer.write(res.stderr)
            return res.returncode
    finally:
        run.remove()


def cmd_shell(args: argparse.Namespace) -> int:
    """Fork a kept VM and open an interactive shell in it (a guest PTY over the control channel)."""
    from pytest_vmfork.cli.shell import interactive
    from pytest_vmfork.vm.kept import find_kept

    run = Run(qemu_user=args.qemu_user)
    try:
        snap = find_kept(args.cache_dir, args.name, ram_gid=run.qemu(_to_stderr).ram_gid)
        with fork(snap, run=run) as vm:
            print(f"[vmfork] {vm.name}: a fork of kept VM {args.name}; exit the shell to tear it down",
                  file=sys.stderr)
            return interactive(vm, args.argv or None)
    finally:
        run.remove()


def cmd_gc(args: argparse.Namespace) -> int:
    from pytest_vmfork.janitor.gc import collect

    report = collect(lease_root=args.lease_dir, cache_dir=args.cache_dir, dry_run=args.dry_run,
                     include_kept=args.kept, orphan_links=args.orphan_links)
    print(report.format())
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """List the cache's entries, or prune them (``vmfork cache prune``)."""
    from pytest_vmfork.host import cache
    from pytest_vmfork.janitor.prune import prune

    if args.action is None:
        print(cache.format_entries(cache.list_entries(args.cache_dir)))
        return 0
    older = cache.parse_age(args.older_than, "--older-than") if args.older_than is not None else None
    size = cache.parse_size(args.max_size, "--max-size") if args.max_size is not None else None
    if older is None and size is None and not args.orphans:
        raise ConfigError("vmfork cache prune needs --older-than AGE (e.g. 30d), --max-size SIZE (e.g. 10G) "
                          "or --orphans (only entries whose dependants are gone)")
    print(prune(args.cache_dir, older_than=older, max_size=size, dry_run=args.dry_run).format())
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from pytest_vmfork.cli import doctor

    checks = doctor.diagnose(args.cache_dir, apt_sources=args.apt_sources, build_mode=args.build_mode,
                             template=load_template(args.template))
    print(doctor.format(checks))
    return 1 if doctor.failed(checks) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmfork", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def building(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cache-dir", type=Path, default=default_cache_dir())
        p.add_argument("--apt-sources", default=os.environ.get("VMFORK_APT_SOURCES") or None,
                       help="Debian sources for the guest (default: the host's bookworm entries)")
        p.add_argument("--build-mode", choices=MODES, default=os.environ.get("VMFORK_BUILD_MODE") or "auto",
                       help="mmdebstrap mode (default auto: root, else unshare, else fakechroot)")

    def qemu_user(p: argparse.ArgumentParser) -> None:
        p.add_argument("--qemu-user", default=os.environ.get("VMFORK_QEMU_USER") or None,
                       help="the user QEMU runs as when run as root (default vmfork-qemu, created "
                            "when needed; root keeps uid 0)")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--template", help="package.module:NAME of a Template (default: the stock one)")
        building(p)
        p.add_argument("--accel", choices=ACCELS, default="auto")
        qemu_user(p)

    b = sub.add_parser("build", help="build the guest image and the template snapshot (cached)")
    common(b)
    b.add_argument("--rebuild", action="store_true", help="boot the template again and retake the snapshot")
    b.set_defaults(func=cmd_build)

    r = sub.add_parser("run", help="fork one VM, run a command in it, tear it down")
    common(r)
    r.add_argument("--timeout", type=float, default=60.0)
    r.add_argument("argv", nargs=argparse.REMAINDER)
    r.set_defaults(func=cmd_run)

    k = sub.add_parser("key", help="print the template's image key (for keying a CI cache of the cache dir)")
    k.add_argument("--template", help="package.module:NAME of a Template (default: the stock one)")
    k.set_defaults(func=cmd_key)

    g = sub.add_parser("gc", help="remove what dead runs left behind (VMs, run dirs, leases, bridges, "
                       "partial builds); never touches a live run")
    g.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    g.add_argument("--kept", action="store_true",
                   help="also remove the VMs (snapshots and files) kept by --vmfork-keep-failed")
    g.add_argument("--orphan-links", action="store_true",
                   help="also delete vmfk* bridges that no lease under --lease-dir names and that have "
                        "no ports (only if no run uses another lease dir)")
    g.add_argument("--lease-dir", type=Path, default=None,
                   help="lease root (default /run/vmfork, else <tmp>/vmfork-<uid>/leases)")
    g.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    g.set_defaults(func=cmd_gc)

    c = sub.add_parser("cache", help="list the cache's entries (kind, key, size on disk, last use, what); "
                       "`vmfork cache prune` removes unused ones")
    c.add_argument("action", nargs="?", choices=["prune"], help="prune: remove entries no live run uses")
    c.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    c.add_argument("--older-than", metavar="AGE",
                   help="prune entries last used longer ago than AGE (e.g. 30d, 12h, 2w)")
    c.add_argument("--max-size", metavar="SIZE",
                   help="then prune least recently used entries until the cache is at most SIZE (e.g. 10G)")
    c.add_argument("--orphans", action="store_true",
                   help="prune only entries whose dependants are gone (always part of a prune)")
    c.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    c.set_defaults(func=cmd_cache)

    kp = sub.add_parser("kept", help="list the failed tests' VMs kept by --vmfork-keep-failed")
    kp.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    kp.set_defaults(func=cmd_kept)

    e = sub.add_parser("exec", help="restore a kept VM, run one command in it, tear it down")
    e.add_argument("name", help="the kept VM's name (`vmfork kept` lists them)")
    e.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    e.add_argument("--timeout", type=float, default=60.0)
    qemu_user(e)
    e.add_argument("argv", nargs=argparse.REMAINDER)
    e.set_defaults(func=cmd_exec)

    sh = sub.add_parser("shell", help="restore a kept VM and open an interactive shell in it")
    sh.add_argument("name", help="the kept VM's name (`vmfork kept` lists them)")
    sh.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    qemu_user(sh)
    sh.add_argument("argv", nargs=argparse.REMAINDER, help="a program to run instead of the login shell")
    sh.set_defaults(func=cmd_shell)

    d = sub.add_parser("doctor",
                       help="check that this host can run forked VMs and say how to fix what is missing")
    building(d)
    d.add_argument("--template", help="package.module:NAME of a Template whose kernel to check (default: the stock one)")
    d.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "argv", None) and args.argv[0] == "--":
        args.argv = args.argv[1:]
    try:
        return int(args.func(args))
    except VMForkError as exc:
        print(f"vmfork: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
