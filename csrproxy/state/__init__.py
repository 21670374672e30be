"""Durable state: the state directory, the SQLite database and the thread that owns it."""
