"""`python -m maskkit.cli`: the same as the `maskkit` console script."""

from maskkit.cli.app import main

if __name__ == "__main__":
    main()
