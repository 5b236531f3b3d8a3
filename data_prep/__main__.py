"""``python -m modelzoo.data_prep ...`` is the same as ``modelzoo-data-prep ...``."""

import sys

from modelzoo.data_prep.cli import main

if __name__ == "__main__":
    sys.exit(main())
