"""What runs on a client: the gatekeeper (a standalone program, see gatekeeper.py)."""
