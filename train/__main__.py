"""``python -m train --config configs/X.yaml [section.key=value ...]``."""

import sys

from train.trainer import main

if __name__ == "__main__":
    sys.exit(main())
