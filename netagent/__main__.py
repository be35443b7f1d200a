import sys

from netagent.cli import main

sys.exit(main())
