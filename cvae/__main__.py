"""`python -m cvae`: the same as the `cvae` command."""

import sys

from cvae.cli import main

if __name__ == "__main__":
    sys.exit(main())
