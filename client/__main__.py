"""`python -m enrollment.client` is `enrollment-client`."""

import sys

from enrollment.client.cli import main

sys.exit(main())
