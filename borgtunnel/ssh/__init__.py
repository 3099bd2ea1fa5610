"""What talks SSH: the tunnel (the only asyncssh user), host-key trust, doctor, enrolment."""
