"""What runs on the backup server itself: local sockets and their ``borg serve`` children,
the server's own borg, private directories."""
