"""Configuration models of the reporting features: ``[notify]``, ``[metrics]``, ``[defaults]`` and
the per-client keys (``max_age``, ``notify``, ``healthchecks``, hooks).

They live in their own module so ``model.py`` only gains the fields that point at them.
Validation follows ``model.py``: unknown keys are errors and messages name what is wrong.
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from types import ModuleType
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from borgtunnel.durations import parse_duration
from borgtunnel.redact import redact_url, remember_url, scrub

EventKind = Literal["failure", "recovery", "stale", "tampering"]
ALL_EVENTS: Final[tuple[EventKind, ...]] = ("failure", "recovery", "stale", "tampering")

# Placeholders a hook's argv words may contain; each is replaced inside its word only.
HOOK_PLACEHOLDERS: Final = ("client", "archive", "result", "error", "repository")
_PLACEHOLDER: Final = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def _duration(value: Any) -> Any:  # noqa: ANN401 - raw TOML value, pydantic checks the result
    return parse_duration(value) if isinstance(value, str | int | float) else value


Duration = Annotated[float, BeforeValidator(_duration)]


def _window(value: Any) -> Any:  # noqa: ANN401 - raw TOML value, pydantic checks the result
    """A duration, or 0 (and "0") for "no window": parse_duration refuses zero on purpose."""
    if value in (0, "0") and not isinstance(value, bool):
        return 0.0
    return _duration(value)


DigestWindow = Annotated[float, BeforeValidator(_window), Field(ge=0, le=3600)]
PositiveSeconds = Annotated[float, Field(gt=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@functools.cache
def import_apprise() -> ModuleType:
    """apprise, imported on first use: it takes half a second, only configs that notify pay.

    apprise 2.x still imports the stdlib's deprecated ``imghdr``; that warning is apprise's to
    fix and says nothing to our users (and would fail tests run with warnings as errors).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import apprise  # noqa: PLC0415 - see above

        # apprise loads its plugins (and so imghdr) on first use: do that here, in one thread,
        # with the filter on, rather than from a sending thread.
        apprise.Apprise.instantiate("json://localhost")
    # apprise explains failed deliveries through stdlib logging, which nobody configures here:
    # Python would print them as bare lines on stderr, between our JSON lines.
    apprise_log = logging.getLogger("apprise")
    apprise_log.addHandler(_ToStructlog())
    apprise_log.propagate = False
    return apprise


class _ToStructlog(logging.Handler):
    """apprise's own warnings and errors as structured ``apprise_said`` lines."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        import structlog  # noqa: PLC0415 - keeps this config module free of logging setup

        # apprise hides most tokens in its messages, not all (mqtt, amqp quote their URL).
        structlog.get_logger("borgtunnel.notify").warning(
            "apprise_said",
            message=scrub(record.getMessage()),
            apprise_level=record.levelname.lower(),
        )


def check_apprise_urls(urls: tuple[str, ...]) -> tuple[str, ...]:
    """Every URL must be one apprise can build a notifier from (checked at load, not at 3 am)."""
    if not urls:
        return urls
    apprise = import_apprise()
    # apprise logs its own "Unparseable URL" line; the config error below says it better.
    apprise_log = logging.getLogger("apprise")
    level = apprise_log.level
    apprise_log.setLevel(logging.CRITICAL)
    try:
        for index, url in enumerate(urls):
            remember_url(url)
            if "\0" in url or apprise.Apprise.instantiate(url) is None:
                # Never the URL itself: a mistyped one still holds its token.
                raise ValueError(
                    f"[{index}]: not a notification URL apprise understands: {redact_url(url)}"
                )
    finally:
        apprise_log.setLevel(level)
    return urls


def check_hooks(hooks: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
    """Each hook is a non-empty argv; placeholders are known names; no NUL bytes."""
    for index, argv in enumerate(hooks):
        if not argv or not argv[0]:
            raise ValueError(f"[{index}]: a hook is a non-empty list: [program, arg, ...]")
        for word in argv:
            if "\0" in word:
                raise ValueError(f"[{index}]: must not contain a NUL byte")
            for match in _PLACEHOLDER.finditer(word):
                name = match.group(1)
                if match.group(0) in {"{", "}"} or (
                    name is not None and name not in HOOK_PLACEHOLDERS
                ):
                    known = ", ".join(f"{{{n}}}" for n in HOOK_PLACEHOLDERS)
                    raise ValueError(
                        f"[{index}]: {word!r} has an unknown placeholder (known: {known};"
                        " write {{ and }} for literal braces)"
                    )
    return hooks


Hooks = tuple[tuple[str, ...], ...]


class NotifySettings(_Model):
    """``[notify]``: where notifications go and which events are sent."""

    urls: tuple[str, ...] = ()
    on: tuple[EventKind, ...] = ALL_EVENTS
    # Per attempt and URL; a dead endpoint never holds up anything else.
    timeout: PositiveSeconds = 10.0
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    retry_wait: PositiveSeconds = 30.0
    # Messages decided within this long of the first one are sent together: one message per URL
    # (a digest when there is more than one). 0 sends each at once. At most an hour.
    digest_window: DigestWindow = 30.0

    @field_validator("urls")
    @classmethod
    def _urls_valid(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_apprise_urls(value)


class MetricsSettings(_Model):
    """``[metrics]``: Prometheus text from the daemon (``listen``) and/or a textfile."""

    listen: str | None = None
    textfile: Annotated[str, Field(min_length=1)] | None = None

    @field_validator("listen")
    @classmethod
    def _listen_valid(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value

    @field_validator("textfile")
    @classmethod
    def _textfile_absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be an absolute path on the server")
        return value


def parse_listen(value: str) -> tuple[str, int]:
    """``"127.0.0.1:9468"`` or ``"[::1]:9468"`` -> (host, port). Port 0 picks a free one."""
    host, sep, port_text = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{value!r} must be HOST:PORT, e.g. '127.0.0.1:9468'")
    return host, int(port_text)


class ClientDefaults(_Model):
    """``[defaults]``: values every client gets unless it sets its own."""

    max_age: Duration | None = None
    before: Hooks = ()
    after: Hooks = ()
    on_failure: Hooks = ()
    hook_timeout: PositiveSeconds = 300.0

    @field_validator("before", "after", "on_failure")
    @classmethod
    def _hooks_valid(cls, value: Hooks) -> Hooks:
        return check_hooks(value)

    @field_validator("max_age")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError("must be longer than zero")
        return value


class HookSet(_Model):
    """The effective hooks of one client."""

    before: Hooks = ()
    after: Hooks = ()
    on_failure: Hooks = ()
    timeout: float = 300.0
