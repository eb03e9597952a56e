"""``python -m pytest_vmfork.cli``: the ``vmfork`` command."""

import sys

from pytest_vmfork.cli import main

sys.exit(main())
