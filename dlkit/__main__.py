"""`python -m dlkit ...` is the `dlkit` command (useful where the console script is not on PATH)."""

from dlkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
