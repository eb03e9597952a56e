"""The checks ``vm.exec()`` and ``vm.spawn()`` share on a command's arguments.

Both send argv, env, cwd, stdin and an output limit to the guest agent in one
request; a mistake in any of them is a ConfigError here, naming the call, before
the request is built (the guest never sees it).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from pytest_vmfork.errors import ConfigError
from pytest_vmfork.vm.agent import MAX_OUTPUT_LIMIT, MAX_SEND

MAX_STDIN = MAX_SEND - 64 * 1024  # argv, env and framing share the request


def argv_of(call: str, argv: Sequence[str] | str) -> list[str]:
    """``argv`` as a list; a string runs under ``/bin/sh -c``."""
    if isinstance(argv, str):
        argv = ["/bin/sh", "-c", argv]
    argv = list(argv)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ConfigError(f"{call} argv must be a non-empty list of strings (or one shell string), got {argv!r}")
    return argv


def check_env_cwd(call: str, env: Mapping[str, str] | None, cwd: str | None) -> None:
    """env maps str to str; cwd is a guest path string (or None: the agent's own)."""
    if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in dict(env).items()):
        raise ConfigError(f"{call} env must map str to str")
    if cwd is not None and not isinstance(cwd, str):
        raise ConfigError(f"{call} cwd={cwd!r} must be a guest path string")


def check_output_limit(call: str, output_limit: Any) -> int:
    """Bytes kept per stream: 1 to MAX_OUTPUT_LIMIT (the guest agent's own bound)."""
    if isinstance(output_limit, bool) or not isinstance(output_limit, int) or \
            not 0 < output_limit <= MAX_OUTPUT_LIMIT:
        raise ConfigError(f"{call} output_limit={output_limit!r}: use a number of bytes from 1 to "
                          f"{MAX_OUTPUT_LIMIT} ({MAX_OUTPUT_LIMIT >> 20} MiB)")
    return output_limit


def stdin_bytes(call: str, name: str, data: bytes | bytearray | str | None) -> bytes | None:
    """The program's stdin as bytes (a str is UTF-8), bounded by what one request carries."""
    if data is None:
        return None
    if isinstance(data, str):
        data = data.encode()
    if not isinstance(data, (bytes, bytearray)):
        raise ConfigError(f"{call} {name} must be bytes or str (written, then closed), got {type(data).__name__}")
    if len(data) > MAX_STDIN:
        raise ConfigError(f"{call} {name} is {len(data)} bytes; at most {MAX_STDIN} bytes fit one "
                          "request: put larger data in a guest file with vm.put() and read it there")
    return bytes(data)
