"""Placeholder: status and history reports are being written (issue: long-running daemon)."""

from borgtunnel.config import ClientConfig, Config


def show_status(config: Config, *, as_json: bool) -> int:
    raise NotImplementedError


def show_history(config: Config, client: ClientConfig, *, limit: int, as_json: bool) -> int:
    raise NotImplementedError
