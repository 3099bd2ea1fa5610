"""The configuration layer: the bottom of the package, importing nothing above it.

* ``model``: the validated, immutable models of the file (``Config``, ``ClientConfig``, …).
* ``reporting``: the models of the reporting keys (``[notify]``, ``[metrics]``, hooks, max_age).
* ``schedule``: pure cron, blackout and jitter maths (parsed at load, used by the daemon).
* ``merge``: inheritance, ``[defaults]`` < ``[groups.NAME]`` < ``[clients.NAME]``, and origins.
* ``loading``: the main file, its ``include`` files, then validation (``load_config``).
* ``effective``: one client's merged settings and their origins (``check-config --client``).

What the rest of borgtunnel uses is re-exported here: ``from borgtunnel.config import Config``.
"""

from borgtunnel.config.loading import config_path, load_config, parse_config
from borgtunnel.config.model import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    DEFAULT_SSH,
    CheckSettings,
    ClientConfig,
    Config,
    ConfigError,
    DaemonSettings,
    RetentionSettings,
    ServerSettings,
    SSHSettings,
    UnknownClientError,
)

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_SSH",
    "CheckSettings",
    "ClientConfig",
    "Config",
    "ConfigError",
    "DaemonSettings",
    "RetentionSettings",
    "SSHSettings",
    "ServerSettings",
    "UnknownClientError",
    "config_path",
    "load_config",
    "parse_config",
]
