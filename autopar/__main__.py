"""``python -m autopar ...`` runs the command line (see :mod:`autopar.cli`)."""

import sys

from autopar.cli.main import main

sys.exit(main())
