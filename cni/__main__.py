"""``python -m cni``: the plugin without an installed launcher (tests, debugging)."""

import sys

from cni.plugin import main

sys.exit(main())
