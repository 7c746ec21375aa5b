"""``python -m deltatune.cli``: the ``deltatune`` command."""

from .main import main

raise SystemExit(main())
