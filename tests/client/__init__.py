"""Tests of csrproxy/client/, the installation's side."""
