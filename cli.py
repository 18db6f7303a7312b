"""``python cli.py COMMAND ...`` from a checkout: the same typer app as ``featgender`` and
``python -m featgender`` (:mod:`featgender.cli`); nothing else lives here."""

from featgender.cli import main

if __name__ == "__main__":
    main()
