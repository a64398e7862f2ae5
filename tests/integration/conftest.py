"""Helpers for tests that start real services (the S3 server and the local Ray fixtures live in
tests/conftest.py, one of each for the whole session)."""

from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
