"""``python -m netagent.cni``: the plugin without an installed launcher (tests, debugging)."""

import sys

from netagent.cni.plugin import main

sys.exit(main())
