"""Shared pytest configuration: registers the sshd fixture plugin (tests/sshd.py)."""

pytest_plugins = ["tests.sshd"]
