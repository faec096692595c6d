"""`python -m revglow ...` runs the command line (see revglow.cli)."""
import sys

from revglow.cli import main

if __name__ == "__main__":
    sys.exit(main())
