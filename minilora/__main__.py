"""``python -m minilora``: the same as the ``minilora`` console script."""

import sys

from minilora.cli import main

if __name__ == "__main__":
    sys.exit(main())
