"""The ``deltatune`` command: ``train``, ``eval``, ``generate``, ``chat``, ``merge``, ``estimate``, ...

``main`` (the console script ``deltatune``, and ``python -m deltatune.cli``) builds the parser in
:mod:`deltatune.cli.main`; each group of commands has its module (``adapter``, ``generate``,
``estimate``; ``hints`` points method names from papers at the flags).
"""

from .main import main

__all__ = ["main"]
