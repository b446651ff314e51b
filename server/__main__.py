"""`python -m server` is `enrollment-server`."""

import sys

from server.cli import main

sys.exit(main())
