"""``python -m fusedres bench|train|experiment|info``: the command line of fusedres/cli/."""

import sys

from fusedres.cli import main

if __name__ == "__main__":
    sys.exit(main())
