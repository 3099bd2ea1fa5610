"""Keeping repositories healthy from the server: retention (prune + compact), check, tamper checks.

Everything here runs the *server's* borg on the repository directly, never through a tunnel: the
client only ever reaches an append-only ``borg serve``, so it can never prune, and the server
holds the repositories and the passphrases.

* ``durations`` / ``retention``: pure parsing, argv builders and "is it due" rules.
* ``tamper``: pure comparison of the repository's archives with the ones the history expects.
* ``server.localborg`` is the one place that executes the server-local borg for these operations.
* ``run``: a maintenance run under the client lock, recorded in the history.
"""
