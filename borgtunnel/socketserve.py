"""Placeholder: `borgtunnel serve` is being written (issue: socket-activated serve)."""

from pathlib import Path

from borgtunnel.config import Config


def run_serve(
    config: Config,
    *,
    listen: Path | None,
    client: str | None,
    idle_timeout: float | None,
    max_connections: int,
) -> int:
    raise NotImplementedError
