"""Several csrproxy instances on one shared state database (issue 16)."""
