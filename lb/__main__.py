"""``python -m lb``: the splicelb command line."""

from lb.cli import main

if __name__ == "__main__":
    main()
