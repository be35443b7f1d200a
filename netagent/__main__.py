import os
import sys

os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

from netagent.cli import main  # noqa: E402

sys.exit(main())
