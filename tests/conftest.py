"""Shared pytest configuration: the sshd fixture plugin (tests/sshd.py) and child processes."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest
import structlog

pytest_plugins = ["tests.sshd", "tests.reporting_kit"]

Spawn = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start child processes that are killed and reaped at teardown, whatever happened."""
    children: list[subprocess.Popen[str]] = []

    def start(*argv: str, close_fds: bool = True) -> subprocess.Popen[str]:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, close_fds=close_fds)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()


@pytest.fixture
def reset_logging() -> Iterator[None]:
    """cli.main configures structlog to write to the captured stderr; undo it afterwards."""
    yield
    structlog.reset_defaults()
