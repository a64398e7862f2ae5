"""Ports for the servers that tests start. Prefer port 0, the server binding a free port itself;
:func:`free_port` is for servers that must be told theirs (Ray), and another process can take it
before they bind it."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_port(pid: int) -> int:
    """The TCP port process ``pid`` listens on, 0 while it listens on none (a server given port 0)."""
    import psutil

    try:
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN:
                return conn.laddr.port
    except psutil.Error:
        pass
    return 0
