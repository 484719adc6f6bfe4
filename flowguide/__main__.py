"""``python -m flowguide``: the ``flowguide`` command line (see :mod:`flowguide.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
