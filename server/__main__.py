"""`python -m enrollment.server` is `enrollment-server`."""

import sys

from enrollment.server.startup.cli import main

sys.exit(main())
