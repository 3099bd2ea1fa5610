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
# A digest's title counts its messages by kind; its colour is the worst kind's.
_DIGEST_WORDS: Final = {
    "failure": "failed",
    "tampering": "TAMPERING",
    "stale": "stale",
    "recovery": "recovered",
}
_SEVERITY: Final = ("tampering", "failure", "stale", "recovery")
# The body lines a digest keeps for each message (the client is in its title).
_DETAIL: Final = ("error: ", "last good backup: ")

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
    failed_sources: Sequence[str] = (),
) -> Message:
    """Title and body naming the client, the result, the failed sources, the error, the
    archive and the age."""
    titles = {
        "failure": f"borgtunnel: backup of {client} FAILED",
        "recovery": f"borgtunnel: backup of {client} is working again",
        "stale": f"borgtunnel: {client} has no recent backup",
        "tampering": f"borgtunnel: TAMPERING suspected on {client}",
    }
    lines = [f"client: {client}"]
    if result:
        lines.append(f"result: {result}")
    if failed_sources:  # configured names, checked at load: no client text
        lines.append(f"failed sources: {', '.join(failed_sources)}")
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


@dataclass(frozen=True)
class Decided:
    """A recorded (``pending``) message and the URLs it goes to."""

    note_id: int
    message: Message
    urls: tuple[str, ...]


def digest(messages: Sequence[Message]) -> Message:
    """One message standing for several: a title counting them by kind, a line for each."""
    counts: dict[str, int] = {}
    for message in messages:
        counts[message.kind] = counts.get(message.kind, 0) + 1
    said = ", ".join(f"{count} {_DIGEST_WORDS.get(kind, kind)}" for kind, count in counts.items())
    lines = []
    for message in messages:
        lines.append(f"- {message.title.removeprefix('borgtunnel: ')}")
        lines.extend(f"  {line}" for line in message.body.splitlines() if line.startswith(_DETAIL))
    worst = next((k for k in _SEVERITY if k in counts), "digest")
    return Message("", worst, f"borgtunnel: {len(messages)} changes: {said}", "\n".join(lines))


def per_url(batch: Sequence[Decided]) -> dict[str, Message]:
    """What each URL gets: its one message, or a digest of all of them (in decided order)."""
    found: dict[str, list[Message]] = {}
    for decided in batch:
        for url in decided.urls:
            found.setdefault(url, []).append(decided.message)
    return {url: ms[0] if len(ms) == 1 else digest(ms) for url, ms in found.items()}


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
        self._waiting: list[Decided] = []
        self._flush_timer: asyncio.TimerHandle | None = None

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
        log.debug("notification_queued", client=message.client, kind=message.kind, id=note_id)
        self._start(note_id, message, urls)

    def resume_pending(self) -> int:
        """Send what an earlier process decided but did not finish sending; returns how many."""
        pending = self._history.pending_notifications()
        for note in pending:
            message = Message(note.client, note.kind, note.title, note.body)
            urls = self._urls_for(note.client)
            if urls:
                log.debug("notification_resumed", client=note.client, kind=note.kind, id=note.id)
                self._start(note.id, message, urls)
            else:
                self._history.finish_notification(note.id, "muted", attempts=0)
        return len(pending)

    def _start(self, note_id: int, message: Message, urls: tuple[str, ...]) -> None:
        """Deliver now (no window) or with whatever else is decided within the digest window."""
        self._waiting.append(Decided(note_id, message, urls))
        if self.settings.digest_window <= 0:
            self.flush()
        elif self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(
                self.settings.digest_window, self.flush
            )

    def flush(self) -> None:
        """Send what waits for the digest window now: one message per URL."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        batch, self._waiting = self._waiting, []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(
            self._deliver(batch), name=f"notify {len(batch)} message(s)"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, batch: list[Decided]) -> None:
        by_url = per_url(batch)
        errors: dict[str, str] = {}
        attempts = 0
        try:
            if len(batch) > 1:
                log.info("notification_digest", messages=len(batch), urls=len(by_url))
            left = list(by_url)
            for attempt in range(self.settings.retries + 1):
                if attempt:
                    await asyncio.sleep(self.settings.retry_wait)
                attempts = attempt + 1
                results = await asyncio.gather(*(self._send_one(u, by_url[u]) for u in left))
                # Only the URLs tried this time: one that took an earlier attempt is done.
                errors = {url: err for url, err in zip(left, results, strict=True) if err}
                for url, err in errors.items():
                    log.warning(
                        "notification_failed",
                        url=_shown(url, next(d.urls for d in batch if url in d.urls)),
                        messages=len(batch),
                        attempt=attempts,
                        attempts=self.settings.retries + 1,
                        error=err,
                    )
                left = list(errors)
                if not left:
                    break
            for decided in batch:
                failed = {u: errors[u] for u in decided.urls if u in errors}
                self._history.finish_notification(
                    decided.note_id,
                    "failed" if failed else "sent",
                    attempts=attempts,
                    error="; ".join(f"{_shown(u, decided.urls)}: {e}" for u, e in failed.items())
                    or None,
                )
                log.debug(
                    "notification_sent" if not failed else "notification_not_sent",
                    client=decided.message.client,
                    kind=decided.message.kind,
                    id=decided.note_id,
                )
            if not errors:
                log.info("notifications_sent", messages=len(batch), urls=len(by_url))
        except asyncio.CancelledError:
            raise  # left 'pending': the next daemon start sends it
        except Exception:  # a bug here must not escape into the event loop's task handler
            log.exception("notification_crashed", messages=len(batch))

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
        """Send what waits for its window now, give deliveries up to ``grace`` seconds, then
        cancel what is left."""
        self.flush()
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
