"""Placeholder: the scheduler service is being written (issue: long-running daemon)."""

from pathlib import Path

from borgtunnel.config import Config


def run_daemon(config_path: Path, config: Config) -> int:
    raise NotImplementedError
