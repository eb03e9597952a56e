"""The guest agent's modules, installed in the image as ``/opt/vmfork/vmfork_agent``.

``/opt/vmfork/agent.py`` (guest/agent.py) is the entry that busybox init starts;
everything else is here, one module per concept, importing downwards only:

- ``boot``: the kernel command line, the virtio-serial ports, the console log;
- ``calls``: a call (one stream of the channel) and the errors it sends back;
- ``programs``: starting and watching a program; Exec;
- ``processes``: background programs (Spawn, ReadProcess, SignalProcess);
- ``files``: PutFile, PutTree, GetFile, GetTree;
- ``shell``: a program on a PTY (``vmfork shell``);
- ``mailboxes``: the locked pages the host patches payloads into;
- ``network``: eth0's configuration (the fast netlink apply, pyroute2);
- ``resume``: what a fork does after the doorbell, up to its ready event;
- ``server``: the selector loop, the channel's dispatch, the events to the host.

A package of its own name (not ``agent``, not under ``pytest_vmfork``) so nothing
on the guest's ``sys.path`` (/opt/vmfork, /opt/vmfork/site, the stdlib) can shadow
it or be shadowed by it. It also imports the host's shared modules
(``pytest_vmfork.channel``, ``mailbox``, ``tree``, ``proto``), copied byte for byte.
"""
