"""borgtunnel: the backup server pulls borg archives from its clients over SSH."""

import warnings

__version__ = "0.1.0"

# asyncssh (2.24) names cryptography's DSA classes when it is imported, and cryptography 51
# deprecates them with a warning each time: every borgtunnel start would print five lines to
# the journal about a key type borgtunnel never uses. Only that message, only from asyncssh;
# pyproject.toml's pytest filterwarnings carries the same exception.
warnings.filterwarnings("ignore", message="DSA is deprecated", module="asyncssh")
