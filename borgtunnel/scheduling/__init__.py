"""The long-running service: the daemon, cron maths, the queue rules."""
