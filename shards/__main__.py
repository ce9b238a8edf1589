"""``python -m shards`` entry point."""

import sys

from shards.cli import main

sys.exit(main())
