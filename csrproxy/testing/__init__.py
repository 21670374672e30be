"""The test kit: pebble and PowerDNS launchers, the fault proxy, the daemon runner, crash
checkpoints, ``make demo``.

Used by the tests, ``bench/`` and ``make demo``; nothing under acme/, issuance/, dns/,
challenges/, state/ or web/ imports it.  Everything listens on 127.0.0.1 on ports picked free
at run time.
"""
