"""``python -m tarflow.launch``: see :mod:`tarflow.launch`."""

import sys

from tarflow.launch import main

sys.exit(main())
