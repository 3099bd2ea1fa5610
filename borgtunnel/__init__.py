"""borgtunnel: the backup server pulls borg archives from its clients over SSH."""

__version__ = "0.1.0"
