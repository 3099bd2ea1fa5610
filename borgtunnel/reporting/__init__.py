"""What the server tells the world about its runs.

Staleness, notifications (apprise), metrics (prometheus-client), hooks and live progress (rich).
``reporting.Reporter.after_run`` is the one call made after every recorded run.
"""
