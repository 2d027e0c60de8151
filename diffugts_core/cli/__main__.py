"""``python -m diffugts_core.cli``: the ``diffugts`` command without the console script."""

import sys

from . import main

sys.exit(main())
