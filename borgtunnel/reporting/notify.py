"""Notifications through apprise: what to say, whether to say it, and delivering it.

Decisions are made from what was already notified (the ``notifications`` table of the history),
never from process memory, so a restarted daemon or the next one-shot ``pull`` neither repeats a
message nor forgets one:

* **failure** once per failure streak: when a final (after its retries) failed run finds no open
  failure since the last recovery;
* **stale** once per stale period: when the client is stale and no stale notice is open;
* **recovery** on the first verified run while a failure, stale or tampering notice is open;
  it closes them all;
* **tampering** every time it is reported (each one is news).

A message is recorded ``pending`` *before* it is sent and ``sent``/``failed`` afterwards; a
process that stops in between leaves it ``pending`` and the next daemon start sends it. Kinds not
in ``[notify] on`` (or with no URL at all) are recorded ``muted``: the streaks stay right and the
history shows what would have been said.

Delivery runs in the background: each URL gets ``timeout`` seconds per attempt and up to
``retries`` more attempts ``retry_wait`` seconds apart; a failing URL is logged at warning. Nothing
here raises into a backup.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import structlog

from borgtunnel.config.reporting import EventKind, NotifySettings, import_apprise
from borgtunnel.history import History, SentNotification
from borgtunnel.redact import redact_url, scrub
from borgtunnel.reporting.background import call_in_thread
from borgtunnel.reporting.staleness import age_text
from borgtunnel.text import printable

log = structlog.get_logger("borgtunnel.notify")

# What apprise shows (colour/icon) for each kind.
_NOTIFY_TYPE: Final = {
    "failure": "failure",
    "tampering": "failure",
    "stale": "warning",
    "recovery": "success",
    "test": "info",
}
PROBLEMS: Final = frozenset({"failure", "stale", "tampering"})

# (url, title, body, notify type, timeout) -> None when delivered, else the reason.
Sender = Callable[[str, str, str, str, float], Awaitable[str | None]]


@dataclass(frozen=True)
class Message:
    client: str
    kind: str
    title: str
    body: str


def compose(
    kind: str,
    client: str,
    *,
    now: datetime,
    result: str | None = None,
    error: str | None = None,
    archive: str | None = None,
    last_success: datetime | None = None,
    max_age: float | None = None,
) -> Message:
    """Title and body naming the client, the result, the error, the archive and the age."""
    titles = {
        "failure": f"borgtunnel: backup of {client} FAILED",
        "recovery": f"borgtunnel: backup of {client} is working again",
        "stale": f"borgtunnel: {client} has no recent backup",
        "tampering": f"borgtunnel: TAMPERING suspected on {client}",
    }
    lines = [f"client: {client}"]
    if result:
        lines.append(f"result: {result}")
    # The client's text: read in a terminal mail reader, its escape sequences would act.
    if error:
        lines.append(f"error: {printable(error)}")
    if archive:
        lines.append(f"archive: {printable(archive)}")
    lines.append(f"last good backup: {age_text(last_success, now)}")
    if kind == "stale" and max_age is not None:
        lines.append(f"max_age: {max_age:g} s")
    return Message(
        client, kind, titles.get(kind, f"borgtunnel: {kind} ({client})"), "\n".join(lines)
    )


def open_problems(notifications: Sequence[SentNotification]) -> set[str]:
    """Problem kinds notified (or muted) since the newest recovery; newest-first input."""
    found: set[str] = set()
    for note in notifications:
        if note.kind == "recovery":
            break
        if note.kind in PROBLEMS:
            found.add(note.kind)
    return found


async def apprise_send(
    url: str, title: str, body: str, notify_type: str, limit: float
) -> str | None:
    """Send through one apprise URL in a daemon thread; None when apprise reports success."""

    def send() -> str | None:
        apprise = import_apprise()
        notifier = apprise.Apprise()
        if not notifier.add(url):
            return "apprise does not understand this URL"
        ok = notifier.notify(body=body, title=title, notify_type=apprise.NotifyType(notify_type))
        return None if ok else "apprise reported a failed delivery"

    try:
        return await call_in_thread(send, limit=limit, name="borgtunnel-notify")
    except TimeoutError:
        return f"no answer within {limit:g} s"
    except Exception as exc:  # noqa: BLE001 - a notifier bug is a failed delivery, nothing more
        return f"{type(exc).__name__}: {exc}"


def _shown(url: str, urls: tuple[str, ...]) -> str:
    """``#2 tgram://…``: its place in the client's list ([notify] urls, then its own)."""
    return redact_url(url, urls.index(url) + 1)


class Dispatcher:
    """Records decided messages and delivers them in background tasks."""

    def __init__(
        self,
        settings: NotifySettings,
        history: History,
        *,
        urls_for: Callable[[str], tuple[str, ...]],
        sender: Sender = apprise_send,
    ) -> None:
        self.settings = settings
        self._history = history
        self._urls_for = urls_for
        self._sender = sender
        self._tasks: set[asyncio.Task[None]] = set()

    def open_problems(self, client: str) -> set[str]:
        return open_problems(self._history.notifications(client, 200))

    def submit(self, message: Message, *, run_id: int | None = None) -> None:
        """Record ``message``; if its kind is enabled and has URLs, send it in the background."""
        urls = self._urls_for(message.client)
        note_id = self._history.add_notification(
            message.client, message.kind, message.title, message.body, run_id=run_id
        )
        if message.kind not in self.settings.on or not urls:
            self._history.finish_notification(note_id, "muted", attempts=0)
            return
        log.info("notification_queued", client=message.client, kind=message.kind, id=note_id)
        self._start(note_id, message, urls)

    def resume_pending(self) -> int:
        """Send what an earlier process decided but did not finish sending; returns how many."""
        pending = self._history.pending_notifications()
        for note in pending:
            message = Message(note.client, note.kind, note.title, note.body)
            urls = self._urls_for(note.client)
            if urls:
                log.info("notification_resumed", client=note.client, kind=note.kind, id=note.id)
                self._start(note.id, message, urls)
            else:
                self._history.finish_notification(note.id, "muted", attempts=0)
        return len(pending)

    def _start(self, note_id: int, message: Message, urls: tuple[str, ...]) -> None:
        task = asyncio.get_running_loop().create_task(
            self._deliver(note_id, message, urls), name=f"notify {message.client} {message.kind}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, note_id: int, message: Message, urls: tuple[str, ...]) -> None:
        errors: dict[str, str] = {}
        attempts = 0
        try:
            left = list(urls)
            for attempt in range(self.settings.retries + 1):
                if attempt:
                    await asyncio.sleep(self.settings.retry_wait)
                attempts = attempt + 1
                results = await asyncio.gather(*(self._send_one(url, message) for url in left))
                errors = {url: err for url, err in zip(left, results, strict=True) if err}
                for url, err in errors.items():
                    log.warning(
                        "notification_failed",
                        client=message.client,
                        kind=message.kind,
                        url=_shown(url, urls),
                        attempt=attempts,
                        attempts=self.settings.retries + 1,
                        error=err,
                    )
                left = list(errors)
                if not left:
                    break
            self._history.finish_notification(
                note_id,
                "failed" if errors else "sent",
                attempts=attempts,
                error="; ".join(f"{_shown(u, urls)}: {e}" for u, e in errors.items()) or None,
            )
            if not errors:
                log.info("notification_sent", client=message.client, kind=message.kind, id=note_id)
        except asyncio.CancelledError:
            raise  # left 'pending': the next daemon start sends it
        except Exception:  # a bug here must not escape into the event loop's task handler
            log.exception("notification_crashed", client=message.client, kind=message.kind)

    async def _send_one(self, url: str, message: Message) -> str | None:
        notify_type = _NOTIFY_TYPE.get(message.kind, "info")
        try:
            error = await self._sender(
                url, message.title, message.body, notify_type, self.settings.timeout
            )
        except Exception as exc:  # noqa: BLE001 - a broken sender is a failed delivery
            error = f"{type(exc).__name__}: {exc}"
        # An exception's text may quote the URL it was sending to (requests does).
        return None if error is None else scrub(error)

    async def aclose(self, grace: float) -> None:
        """Give background deliveries up to ``grace`` seconds, then cancel what is left."""
        tasks = list(self._tasks)
        if not tasks:
            return
        _, left = await asyncio.wait(tasks, timeout=grace)
        for task in left:
            task.cancel()
        if left:
            log.warning("notifications_abandoned", count=len(left), kept="pending, resent later")
            await asyncio.wait(left)


async def send_test(
    urls: Sequence[str], client: str | None, *, limit: float, sender: Sender = apprise_send
) -> list[tuple[str, str | None]]:
    """``notify-test``: one test message through each URL; (``#N scheme://…``, error or None)."""
    who = client or "this server"
    title = f"borgtunnel: test notification for {who}"
    body = f"This is a test message from borgtunnel notify-test ({who})."
    results = await asyncio.gather(*(sender(u, title, body, "info", limit) for u in urls))
    return [
        (redact_url(u, index), None if err is None else scrub(err))
        for index, (u, err) in enumerate(zip(urls, results, strict=True), start=1)
    ]


__all__ = [
    "Dispatcher",
    "EventKind",
    "Message",
    "apprise_send",
    "compose",
    "notify_test",
    "open_problems",
    "redact_url",
    "send_test",
]


async def notify_test(urls: Sequence[str], client: str | None, *, limit: float) -> int:
    """Print one line per URL (``ok`` or ``FAILED … reason``); 0 when every URL took it."""
    if not urls:
        print("borgtunnel: no notification URLs configured ([notify] urls, clients.NAME.notify)")
        return 2
    results = await send_test(urls, client, limit=limit)
    for url, error in results:
        said = "ok      " + url if error is None else f"FAILED  {url}: {printable(error)}"
        print(said, flush=True)
    return 0 if all(error is None for _, error in results) else 2
