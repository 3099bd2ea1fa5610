"""The daemon's control socket protocol: one JSON object per line, both ways (docs/control.md).

A connection carries one request. ``pull`` then streams ``queued``, ``started``, ``progress``…
and ends with ``finished``; a second line ``{"op": "cancel", …}`` on the same connection (or
the connection closing) cancels that pull. ``cancel``, ``pause`` and ``resume`` get one
``done`` line. A request the daemon cannot take gets one ``error`` line.

Every read is bounded by ``MAX_REQUEST_BYTES`` (server) or ``MAX_RESPONSE_BYTES`` (client) per
line: a peer cannot make the other side buffer more than that.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from borgtunnel.borg import Progress

CONTROL_SOCKET_NAME: Final = "control.sock"
MAX_REQUEST_BYTES: Final = 4096
MAX_RESPONSE_BYTES: Final = 64 * 1024


def control_socket_path(socket_dir: Path) -> Path:
    """In ``[server] socket_dir`` (/run/borgtunnel), the daemon's private runtime directory."""
    return socket_dir / CONTROL_SOCKET_NAME


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ClientName = Annotated[str, Field(min_length=1, max_length=200)]


class PullRequest(_Message):
    op: Literal["pull"] = "pull"
    client: ClientName
    wait: bool = False
    progress: bool = False


class CancelRequest(_Message):
    op: Literal["cancel"] = "cancel"
    client: ClientName


class PauseRequest(_Message):
    op: Literal["pause"] = "pause"
    client: ClientName
    until: datetime | None = None


class ResumeRequest(_Message):
    op: Literal["resume"] = "resume"
    client: ClientName


Request = Annotated[
    PullRequest | CancelRequest | PauseRequest | ResumeRequest, Field(discriminator="op")
]
REQUEST: Final[TypeAdapter[Request]] = TypeAdapter(Request)


class Queued(_Message):
    type: Literal["queued"] = "queued"
    position: int


class Started(_Message):
    type: Literal["started"] = "started"


class ProgressEvent(_Message):
    """borg's progress figures (``borg.Progress``) on the wire."""

    type: Literal["progress"] = "progress"
    original_size: int
    compressed_size: int
    deduplicated_size: int
    nfiles: int
    path: str
    finished: bool = False

    @classmethod
    def of(cls, figures: Progress) -> ProgressEvent:
        return cls(**dataclasses.asdict(figures))

    def figures(self) -> Progress:
        return Progress(**self.model_dump(exclude={"type"}))


class Finished(_Message):
    type: Literal["finished"] = "finished"
    result: str
    exit_code: int
    summary: str


class Done(_Message):
    type: Literal["done"] = "done"
    ok: bool
    message: str


class Error(_Message):
    type: Literal["error"] = "error"
    message: str


Response = Annotated[
    Queued | Started | ProgressEvent | Finished | Done | Error, Field(discriminator="type")
]
RESPONSE: Final[TypeAdapter[Response]] = TypeAdapter(Response)


def encode(message: BaseModel) -> bytes:
    return json.dumps(message.model_dump(mode="json"), ensure_ascii=True).encode() + b"\n"
