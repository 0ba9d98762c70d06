"""``python -m loopwatch``: the same as the ``loopwatch`` command."""

from ._cli import main

raise SystemExit(main())
