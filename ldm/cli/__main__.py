"""``python -m ldm.cli`` = the ``ldm`` console script (used where a child process must run ``ldm``)."""

import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main())
