"""Configuration: TOML file -> validated, immutable models.

Every model forbids unknown keys, so a typo is an error rather than a silently ignored setting.
Errors are collected by pydantic and rendered as one line per bad key, with the key as a dotted
path (``clients.web1.port: Input should be a valid integer``): that is what an administrator
greps for in a file with hundreds of clients.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, tzinfo
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from borgtunnel.config.merge import Origin
from borgtunnel.config.reporting import (
    ClientDefaults,
    Duration,
    Hooks,
    HookSet,
    MetricsSettings,
    NotifySettings,
    check_apprise_urls,
    check_hooks,
)
from borgtunnel.config.schedule import (
    parse_blackout,
    parse_schedule,
    system_zone,
    validate_blackouts,
)
from borgtunnel.config.sources import SourceSettings, check_unique
from borgtunnel.durations import parse_borg_interval
from borgtunnel.redact import remember_url
from borgtunnel.text import option_like

DEFAULT_CONFIG_PATH = Path("/etc/borgtunnel/borgtunnel.toml")
CONFIG_ENV = "BORGTUNNEL_CONFIG"

# Client names become socket file names, systemd FileDescriptorName= values and log fields:
# keep them to a conservative, shell- and path-safe alphabet.
CLIENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# sun_path is 108 bytes on Linux and 104 on the BSDs; OpenSSH's sshd also limits it.
MAX_SOCKET_PATH = 100

QUOTA_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([KMGTP]?)$")
MIN_QUOTA = 10 * 1000**2  # borg serve refuses less

# 16 MiB: the SSH channel window is the throughput lever on high-latency links (asyncssh's 2 MiB
# default caps a 40 ms RTT link at ~23 MB/s; 16 MiB reaches ~150 MB/s, see BENCHMARKS.md).
DEFAULT_WINDOW = 16 * 1024 * 1024

# borg 1.x's modes (`borg init --encryption`) and borg 2's (`borg repo-create --encryption`: the
# key always in the repository; b25 has no "none"). Which family a client may use follows from
# its borg_version, checked below.
Borg1Encryption = Literal[
    "none",
    "authenticated",
    "authenticated-blake2",
    "repokey",
    "repokey-blake2",
    "keyfile",
    "keyfile-blake2",
]
Borg2Encryption = Literal[
    "aes256-ocb",
    "chacha20-poly1305",
    "authenticated-sha256",
    "authenticated-blake3",
]
Encryption = Literal[Borg1Encryption, Borg2Encryption]
BORG1_ENCRYPTIONS: tuple[str, ...] = get_args(Borg1Encryption)
BORG2_ENCRYPTIONS: tuple[str, ...] = get_args(Borg2Encryption)

PositiveSeconds = Annotated[float, Field(gt=0)]

# borg 2 (`borg serve --rest --permissions P`): what each permission lets a client do through its
# tunnel, measured with 2.0.0b25 (docs/borg-versions.md). Only those a pull works with and that
# keep the client from deleting are allowed.
BORG2_PERMISSIONS = ("write-only", "no-delete")
BORG2_DEFAULT_PERMISSIONS = "write-only"
_PERMISSIONS_REFUSED = {
    "all": "lets the client delete archives, the repository and the key through its tunnel",
    "read-only": "no archive can be written with it (borgtunnel uses it for restores only)",
}
# A borg 2 archive name is a series: every pull of the client writes one more archive of the same
# name, told apart by id and time (borg 2's prune groups by it).
BORG2_DEFAULT_ARCHIVE = "{hostname}"


_NAME_KEY = "__borgtunnel_client_name__"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Model):
    """``[server]``: where the server keeps its sockets, state and which borg it runs."""

    socket_dir: Path = Path("/run/borgtunnel")
    state_dir: Path = Path("/var/lib/borgtunnel")
    borg: str = "borg"
    # The server's borg 2 executable, for clients with borg_version = 2 (their repositories are
    # borg 2's: served, created, verified and maintained by it). Debian ships none: a venv's borg.
    borg2: str | None = None
    # How long a `borg serve` child gets after SIGTERM before SIGKILL. borg closes the repository
    # and releases its lock on SIGTERM; SIGKILL leaves a stale lock that the next serve clears.
    serve_stop_timeout: PositiveSeconds = 10.0

    @field_validator("socket_dir", "state_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value


def _absolute_or_none(value: Path | None) -> Path | None:
    if value is not None and not value.is_absolute():
        raise ValueError("must be an absolute path on the server")
    return value


class SSHOptions(_Model):
    """SSH settings. In ``[ssh]`` they are defaults; in ``[clients.NAME.ssh]`` overrides."""

    identity: Path | None = None
    known_hosts: Path | None = None
    keepalive_interval: Annotated[float, Field(ge=0)] | None = None
    keepalive_count_max: Annotated[int, Field(ge=1)] | None = None
    connect_timeout: PositiveSeconds | None = None
    # Receive window of the forwarded channel, in bytes.
    window: Annotated[int, Field(ge=64 * 1024, le=1024 * 1024 * 1024)] | None = None
    ciphers: tuple[str, ...] | None = None
    # Use an ssh-agent (from $SSH_AUTH_SOCK) in addition to `identity`. Off by default: a
    # daemon should not pick up whatever agent happens to be in its environment.
    agent: bool | None = None

    @field_validator("identity", "known_hosts")
    @classmethod
    def _paths_absolute(cls, value: Path | None) -> Path | None:
        return _absolute_or_none(value)


DEFAULT_SSH = SSHOptions(
    identity=Path("/etc/borgtunnel/id_ed25519"),
    known_hosts=Path("/etc/borgtunnel/known_hosts"),
    keepalive_interval=10,
    keepalive_count_max=30,
    connect_timeout=30,
    window=DEFAULT_WINDOW,
    # AES-GCM first: measured 30-40 % faster than asyncssh's chacha20-poly1305 default here.
    ciphers=(
        "aes128-gcm@openssh.com",
        "aes256-gcm@openssh.com",
        "chacha20-poly1305@openssh.com",
        "aes128-ctr",
        "aes256-ctr",
    ),
    agent=False,
)


class SSHSettings(_Model):
    """The effective SSH settings of one client: every field resolved."""

    identity: Path | None
    known_hosts: Path
    keepalive_interval: float
    keepalive_count_max: int
    connect_timeout: float
    window: int
    ciphers: tuple[str, ...]
    agent: bool


def _merge_ssh(*layers: SSHOptions | None) -> SSHSettings:
    """Later layers override earlier ones, key by key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is not None:
            merged.update(layer.model_dump(exclude_none=True, exclude_unset=True))
    return SSHSettings.model_validate(merged)


KeepCount = Annotated[int, Field(ge=0, le=100_000)]


class RetentionSettings(_Model):
    """``[clients.NAME.retention]``: borg prune rules, run by the server after verified pulls."""

    keep_within: str | None = None
    keep_hourly: KeepCount = 0
    keep_daily: KeepCount = 0
    keep_weekly: KeepCount = 0
    keep_monthly: KeepCount = 0
    keep_yearly: KeepCount = 0
    # borg compact after a prune that removed something (frees the space on disk).
    compact: bool = True

    @field_validator("keep_within")
    @classmethod
    def _within_valid(cls, value: str | None) -> str | None:
        if value is not None:
            parse_borg_interval(value)
        return value

    @model_validator(mode="after")
    def _some_rule(self) -> Self:
        # borg prune without any rule refuses to run; an empty table is a mistake, not "keep all".
        counts = (self.keep_hourly, self.keep_daily, self.keep_weekly, self.keep_monthly)
        if self.keep_within is None and not any((*counts, self.keep_yearly)):
            raise ValueError("set keep_within or at least one keep_* count above 0")
        return self


class CheckSettings(_Model):
    """``[clients.NAME.check]``: borg check when the last one is older than ``every``."""

    every: str = "30d"
    verify_data: bool = False

    @field_validator("every")
    @classmethod
    def _every_valid(cls, value: str) -> str:
        parse_borg_interval(value)
        return value


# lvcreate -L SIZE (units b s k m g t p e, any case) or -l N%{ORIGIN,VG,FREE,PVS}.
LVM_SIZE_RE = re.compile(
    r"[1-9][0-9]{0,15}(\.[0-9]{1,6})?[bBsSkKmMgGtTpPeE]?|[1-9][0-9]{0,2}%(ORIGIN|VG|FREE|PVS)"
)


class ClientConfig(_Model):
    """``[clients.NAME]``: one machine to pull from."""

    # Filled in from the table key by Config under an alias nobody writes, so a `name` key in the
    # file is reported as unknown rather than silently disagreeing with the table key.
    name: str = Field(default="", validation_alias=_NAME_KEY)
    host: str = Field(min_length=1)
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    user: str = Field(default="root", min_length=1)
    repository: Path
    # The client's borg major version: 1 (1.2 and 1.4: the ssh:// RPC, served --append-only) or 2
    # (borg 2's repositories, served --rest with `permissions`). Declared before the settings
    # whose meaning depends on it, so their validators see it.
    borg_version: Literal[1, 2] = 1
    # borg 2 only: `borg serve --permissions` for the client's tunnel (docs/borg-versions.md).
    permissions: str | None = None
    paths: tuple[str, ...] = Field(min_length=1)
    exclude: tuple[str, ...] = ()
    archive: str = "{hostname}-{now}"
    encryption: Encryption = "repokey-blake2"
    passphrase_file: Path | None = None
    passphrase_command: str | None = Field(default=None, min_length=1)
    create_args: tuple[str, ...] = ()
    # Database dumps and commands streamed into the same archive (borgtunnel/config/sources.py).
    sources: tuple[SourceSettings, ...] = ()
    remote_borg: str = Field(default="borg", min_length=1)
    remote_socket: str = ""  # default derived from name: ~/.cache/borgtunnel/NAME.sock
    ssh: SSHOptions | None = None
    # Daemon scheduling. A client without a schedule is only pulled on demand.
    schedule: str | None = None
    jitter: Annotated[float, Field(ge=0)] = 0.0
    retries: Annotated[int, Field(ge=0, le=100)] = 2
    retry_wait: PositiveSeconds = 60.0
    # A run still going after this long is cancelled and recorded failed: no run may hold a
    # daemon slot for ever. Raise it for a first backup of a very large data set.
    timeout: PositiveSeconds = 24 * 3600.0
    # Seconds without any output from the client's borg (it reports progress a few times a
    # second) and without any repository traffic: a hung mount, a stopped client.
    stall_timeout: PositiveSeconds = 1800.0
    blackout: tuple[str, ...] = ()
    # A slot that passed while the daemon was down (or the client unreachable) is pulled once at
    # daemon start / when the client answers again; false: wait for the next slot
    # (borgtunnel/scheduling/catchup.py, docs/catch-up-and-alerts.md). A plain true/false only.
    catch_up: StrictBool = True
    # Passed to `borg serve --storage-quota`: one client cannot fill the disk every repository
    # shares. borg's size syntax: a number with an optional K, M, G, T or P suffix.
    storage_quota: str | None = None
    # Maintenance on the server (borgtunnel/maintenance/); none of it runs without these tables.
    retention: RetentionSettings | None = None
    check: CheckSettings | None = None
    # A verified pull whose file count or original size fell by more than this many percent
    # against the client's previous archive is a warning (wrong mount, emptied tree, wipe).
    max_shrink: Annotated[float, Field(gt=0, le=100)] = 50.0
    # Reporting (borgtunnel/reporting/): None means "use [defaults]".
    max_age: Duration | None = None
    notify: tuple[str, ...] = ()  # apprise URLs on top of [notify] urls
    healthchecks: Annotated[str, Field(min_length=1)] | None = None
    before: Hooks | None = None
    after: Hooks | None = None
    on_failure: Hooks | None = None
    hook_timeout: PositiveSeconds | None = None
    # Filesystem snapshots on the client, taken before borg starts (docs/snapshots.md).
    snapshot: Literal["btrfs", "lvm"] | None = None
    snapshot_fallback: bool = False  # true: no snapshot -> back up the live files, a warning
    lvm_snapshot_size: str = "10%ORIGIN"

    @field_validator("lvm_snapshot_size")
    @classmethod
    def _lvm_size_valid(cls, value: str) -> str:
        if not LVM_SIZE_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not an LVM snapshot size: a size such as '1G' or '512M' "
                "(lvcreate -L), or a share such as '10%ORIGIN', '20%FREE' (lvcreate -l)"
            )
        return value

    @model_validator(mode="after")
    def _snapshot_paths_valid(self) -> Self:
        if self.snapshot is None:
            return self
        if self.sources:
            # Not built yet: the snapshot's mount namespace and the dumps' pipes in one run.
            raise ValueError(
                "snapshot: not supported together with sources yet; give the dumps and the "
                "snapshotted files two clients (two repositories)"
            )
        for path in self.paths:
            # The client script keeps the paths one a line; "/" itself cannot be covered by a
            # mount (a process's root is not crossed by lookups).
            if "\n" in path:
                raise ValueError(f"snapshot: path {path!r} contains a newline")
            if path.rstrip("/") == "":
                raise ValueError(
                    "snapshot: '/' cannot be backed up from a snapshot; list the directories "
                    "below it in paths"
                )
        return self

    @model_validator(mode="before")
    @classmethod
    def _borg2_defaults(cls, data: Any) -> Any:  # noqa: ANN401 - raw input, checked next
        """borg 2's own defaults for what is unset: its encryption mode and a series name."""
        if isinstance(data, Mapping) and data.get("borg_version") == 2:
            data = {"encryption": "aes256-ocb", "archive": BORG2_DEFAULT_ARCHIVE, **data}
        return data

    @field_validator("permissions")
    @classmethod
    def _permissions_valid(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        if info.data.get("borg_version") != 2:
            raise ValueError(
                "only for borg_version = 2: borg 1.x clients are always served --append-only"
            )
        if value in _PERMISSIONS_REFUSED:
            raise ValueError(f"{value!r} is refused: it {_PERMISSIONS_REFUSED[value]}")
        if value not in BORG2_PERMISSIONS:
            raise ValueError(f"must be one of {', '.join(BORG2_PERMISSIONS)}, not {value!r}")
        return value

    @field_validator("encryption")
    @classmethod
    def _encryption_matches_version(cls, value: str, info: ValidationInfo) -> str:
        version = info.data.get("borg_version")
        allowed = BORG2_ENCRYPTIONS if version == 2 else BORG1_ENCRYPTIONS
        if value not in allowed:
            raise ValueError(
                f"{value!r} is not a borg {version} mode; borg_version = {version} takes "
                f"{', '.join(allowed)}"
            )
        return value

    @property
    def borg2(self) -> bool:
        """The client runs borg 2 and its repository is a borg 2 one."""
        return self.borg_version == 2

    @property
    def serve_permissions(self) -> str:
        """What the client's `borg serve --rest` may do (borg 2 clients only)."""
        return self.permissions or BORG2_DEFAULT_PERMISSIONS

    @field_validator("notify")
    @classmethod
    def _notify_valid(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_apprise_urls(value)

    @field_validator("healthchecks")
    @classmethod
    def _healthchecks_valid(cls, value: str | None) -> str | None:
        if value is not None:
            remember_url(value)  # the ping UUID is the secret: never in a log line
            if not value.startswith(("http://", "https://")):
                raise ValueError("must be an http:// or https:// ping URL")
        return value

    @field_validator("before", "after", "on_failure")
    @classmethod
    def _hooks_valid(cls, value: Hooks | None) -> Hooks | None:
        return None if value is None else check_hooks(value)

    @field_validator("schedule")
    @classmethod
    def _schedule_valid(cls, value: str | None) -> str | None:
        if value is not None:
            parse_schedule(value, tz=UTC)
        return value

    @field_validator("blackout")
    @classmethod
    def _blackout_valid(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        validate_blackouts([parse_blackout(spec) for spec in value])
        return value

    @field_validator("storage_quota")
    @classmethod
    def _quota_valid(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        if info.data.get("borg_version") == 2:
            raise ValueError(
                "borg 2's serve has no --storage-quota (2.0.0b25), so it cannot be enforced: "
                "remove it, or put the repository on its own filesystem or quota"
            )
        match = QUOTA_RE.match(value)
        if not match:
            raise ValueError(
                f"{value!r} is not a size borg understands (a number with an optional "
                "K, M, G, T or P suffix, e.g. '500G')"
            )
        number, unit = float(match.group(1)), match.group(2) or ""
        if number * 1000 ** "_KMGTP".index(unit or "_") < MIN_QUOTA:
            raise ValueError(f"{value!r} is below borg's minimum storage quota of 10M")
        return value

    @field_validator("remote_borg")
    @classmethod
    def _remote_borg_valid(cls, value: str) -> str:
        # Split here, once, at load time: a quoting mistake is a config error naming this key,
        # not a crash in the middle of a pull.
        try:
            words = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot be split into words like a shell would: {exc}") from None
        if not words:
            raise ValueError("must name a program")
        _check_no_nul(value)
        return value

    @field_validator("repository")
    @classmethod
    def _repository_absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("must be an absolute path on the server")
        return value

    # The daemon's working directory is not the administrator's shell's: relative paths would
    # resolve differently under systemd than in a manual pull.
    @field_validator("passphrase_file")
    @classmethod
    def _passphrase_file_absolute(cls, value: Path | None) -> Path | None:
        return _absolute_or_none(value)

    @field_validator("paths")
    @classmethod
    def _paths_valid(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            _check_no_nul(path)
            # Absolute paths only: the remote working directory is whatever the login shell
            # gives, and "-" would make borg read the backup from stdin.
            if not path.startswith("/"):
                raise ValueError(f"{path!r} must be an absolute path on the client")
        return value

    @field_validator("sources")
    @classmethod
    def _sources_unique(cls, value: tuple[SourceSettings, ...]) -> tuple[SourceSettings, ...]:
        return check_unique(value)

    @field_validator("exclude", "create_args")
    @classmethod
    def _no_nul(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            _check_no_nul(item)
        return value

    @field_validator("archive")
    @classmethod
    def _archive_valid(cls, value: str) -> str:
        _check_no_nul(value)
        if not value.strip():
            raise ValueError("must not be empty")
        if "/" in value:
            raise ValueError("must not contain '/' (borg archive names cannot)")
        if (problem := option_like(value)) is not None:
            raise ValueError(f"{problem}: every pull would be refused at verification")
        return value

    @field_validator("remote_socket")
    @classmethod
    def _remote_socket_valid(cls, value: str) -> str:
        if not value:
            return value
        _check_no_nul(value)
        if not value.startswith(("/", "~/")):
            raise ValueError("must be absolute or start with '~/'")
        if value.endswith("/"):
            raise ValueError("must name a socket file, not a directory")
        if "\n" in value:
            raise ValueError("must not contain a newline")
        if len(value.encode()) > MAX_SOCKET_PATH:
            raise ValueError(f"is longer than {MAX_SOCKET_PATH} bytes (unix socket path limit)")
        return value

    @model_validator(mode="after")
    def _passphrase_matches_encryption(self) -> Self:
        given = [
            k for k in ("passphrase_file", "passphrase_command") if getattr(self, k) is not None
        ]
        if len(given) > 1:
            raise ValueError("set only one of passphrase_file and passphrase_command")
        if self.encryption == "none" and given:
            raise ValueError(f"{given[0]} is set but encryption is 'none'")
        if self.encryption != "none" and not given:
            raise ValueError(
                f"encryption {self.encryption!r} needs passphrase_file or passphrase_command"
            )
        return self

    @property
    def remote_socket_path(self) -> str:
        return self.remote_socket or f"~/.cache/borgtunnel/{self.name}.sock"


class DaemonSettings(_Model):
    """``[daemon]``: how the long-running service schedules pulls."""

    max_parallel: Annotated[int, Field(ge=1, le=256)] = 4
    # How long running pulls may finish after SIGTERM before they are cancelled.
    stop_timeout: Annotated[float, Field(ge=0)] = 60.0
    # IANA zone for schedules and blackout windows; default: the system's local zone.
    timezone: str | None = None

    @field_validator("timezone")
    @classmethod
    def _zone_valid(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r}") from None
        return value

    def zone(self) -> tzinfo:
        return ZoneInfo(self.timezone) if self.timezone else system_zone()


class Config(_Model):
    """The whole file."""

    server: ServerSettings = ServerSettings()
    daemon: DaemonSettings = DaemonSettings()
    ssh: SSHOptions = SSHOptions()
    notify: NotifySettings = NotifySettings()
    metrics: MetricsSettings = MetricsSettings()
    defaults: ClientDefaults = ClientDefaults()
    clients: dict[str, ClientConfig] = Field(default_factory=dict)
    source: Path | None = Field(default=None, exclude=True)
    # Where each client's settings were written and which group it is in (config/merge.py);
    # set by the loader, shown by `check-config --client`.
    origins: dict[str, dict[str, Origin]] = Field(default_factory=dict, exclude=True)
    groups_of: dict[str, str | None] = Field(default_factory=dict, exclude=True)
    client_files: dict[str, Path | None] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _name_clients(cls, data: Any) -> Any:  # noqa: ANN401 - pydantic hands over raw input
        """Copy each table key into the client as ``name`` so a client knows who it is."""
        if isinstance(data, Mapping) and isinstance(data.get("clients"), Mapping):
            clients = {
                name: {**table, _NAME_KEY: name} if isinstance(table, Mapping) else table
                for name, table in data["clients"].items()
            }
            data = {**data, "clients": clients}
        return data

    @field_validator("clients", mode="before")
    @classmethod
    def _client_names(cls, value: Any) -> Any:  # noqa: ANN401 - raw input, checked by pydantic next
        for name in value if isinstance(value, Mapping) else ():
            if (problem := bad_client_name(name)) is not None:
                raise ValueError(problem)
        return value

    def client(self, name: str) -> ClientConfig:
        try:
            return self.clients[name]
        except KeyError:
            known = ", ".join(sorted(self.clients)) or "none"
            raise UnknownClientError(name, known) from None

    def borg_for(self, client: ClientConfig) -> str:
        """The server's borg for this client's repository: borg 2's for a borg 2 client."""
        if client.borg2 and self.server.borg2 is not None:
            return self.server.borg2
        return self.server.borg

    def ssh_for(self, client: ClientConfig) -> SSHSettings:
        return _merge_ssh(DEFAULT_SSH, self.ssh, client.ssh)

    def max_age_for(self, client: ClientConfig) -> float | None:
        """Seconds after which the client's last verified archive is stale; None: never."""
        return client.max_age if client.max_age is not None else self.defaults.max_age

    def hooks_for(self, client: ClientConfig) -> HookSet:
        """A client's own hook list replaces the default one of the same kind (not merged)."""
        d = self.defaults
        return HookSet(
            before=d.before if client.before is None else client.before,
            after=d.after if client.after is None else client.after,
            on_failure=d.on_failure if client.on_failure is None else client.on_failure,
            timeout=d.hook_timeout if client.hook_timeout is None else client.hook_timeout,
        )

    def notify_urls_for(self, client: ClientConfig | None) -> tuple[str, ...]:
        extra = client.notify if client is not None else ()
        return tuple(dict.fromkeys((*self.notify.urls, *extra)))

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as JSON-able data, secrets left out.

        The only secrets borgtunnel handles are passphrases; they live behind passphrase_file or
        passphrase_command and are never read here. The command itself may embed a token, so it
        is masked too.
        """
        data = self.model_dump(mode="json")
        for name, client in self.clients.items():
            entry = data["clients"][name]
            if client.passphrase_command:
                entry["passphrase_command"] = "<hidden>"  # noqa: S105 - a mask, not a password
            entry["remote_socket"] = client.remote_socket_path
            entry["ssh"] = self.ssh_for(client).model_dump(mode="json")
            # Notification and ping URLs usually carry a token or a password.
            entry["notify"] = [_MASK for _ in client.notify]
            if client.healthchecks:
                entry["healthchecks"] = _MASK
        data["notify"]["urls"] = [_MASK for _ in self.notify.urls]
        data.pop("ssh")
        return data


_MASK = "<hidden>"


def bad_client_name(name: str) -> str | None:
    """Why ``name`` cannot be a client name, or None."""
    if CLIENT_NAME_RE.match(name):
        return None
    return (
        f"client name {name!r} must be 1-64 characters of A-Z a-z 0-9 . _ - "
        "and start with a letter or digit"
    )


def _check_no_nul(value: str) -> None:
    if "\0" in value:
        raise ValueError("must not contain a NUL byte")


class UnknownClientError(KeyError):
    """A client name given on the command line is not in the configuration."""

    def __init__(self, name: str, known: str) -> None:
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return f"no client {self.name!r} in the configuration (configured: {self.known})"


class ConfigError(Exception):
    """The configuration cannot be used. Carries one (key, message) pair per problem."""

    def __init__(self, source: Path | None, problems: Sequence[tuple[str, str]]) -> None:
        super().__init__(source, problems)
        self.source = source
        self.problems = tuple(problems)

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def lines(self) -> Iterator[str]:
        where = str(self.source) if self.source else "<config>"
        yield f"{where}: invalid configuration"
        for key, message in self.problems:
            yield f"  {key}: {message}" if key else f"  {message}"


def _dotted(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif parts:
            parts.append(f".{part}")
        else:
            parts.append(str(part))
    return "".join(parts)


def problems_from(error: ValidationError) -> list[tuple[str, str]]:
    """Turn pydantic's error list into (dotted key, message) pairs."""
    problems = []
    for item in error.errors(include_url=False):
        # Drop pydantic's internal location parts (e.g. the function-after validator name).
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function")))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling)"
        problems.append((_dotted(loc), message))
    return problems


def cross_problems(config: Config) -> list[tuple[str, str]]:
    """What only the whole file can tell, each named by the key to change."""
    problems = []
    # Locks, prune, tamper checks and borg 2's lock release are per client: a repository two
    # clients share would be pruned for one by the other and raced by both.
    owner: dict[Path, str] = {}
    for name, client in config.clients.items():
        first = owner.setdefault(client.repository, name)
        if first != name:
            shared = f"{client.repository} is also clients.{first}.repository"
            problems.append(
                (f"clients.{name}.repository", f"{shared}: each client needs its own repository")
            )
    return problems + [
        (
            f"clients.{name}.borg_version",
            (
                "borg_version = 2 needs [server] borg2: the server's borg 2 executable (it "
                "serves, creates, verifies and maintains the client's borg 2 repository)"
            ),
        )
        for name, client in config.clients.items()
        if client.borg2 and config.server.borg2 is None
    ]
