"""What runs on the client: the one remote command of a run (remote.py, built here, run there)
and the gatekeeper (gatekeeper.py, a standalone program installed on the client)."""
