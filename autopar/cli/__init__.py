"""The ``autopar`` command line: :func:`autopar.cli.main.main` (the console script) and one module
per subcommand.

``main`` parses and dispatches; ``estimate``, ``plan``, ``report``, ``run``, ``profile``,
``hardware`` and ``models`` each define one subcommand; ``args`` holds the MODEL/--cluster/--plan
arguments several of them share; ``demo`` is ``make demo`` (``python -m autopar.cli.demo``).
"""
