"""``python -m csrproxy.client``: the same as ``csrproxy-client``."""

import sys

from csrproxy.client.cli import main

sys.exit(main())
