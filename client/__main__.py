"""`python -m client` is `enrollment-client`."""

import sys

from client.cli import main

sys.exit(main())
