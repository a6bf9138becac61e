"""``python -m lb``: the same as the ``lb`` command."""

from lb.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
