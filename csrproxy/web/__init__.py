"""The client-facing HTTP API: Klein routes, problem documents, tokens and networks, limits."""
