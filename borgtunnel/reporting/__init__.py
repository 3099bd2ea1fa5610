"""What the server tells the world about its runs.

Staleness, notifications (apprise), metrics (prometheus-client) and live progress (rich); the
hooks run around a pull live with the runs (``runs.hooks``).
``reporting.Reporter.after_run`` is the one call made after every recorded run.
"""
