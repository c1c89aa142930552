"""`python -m spotrun_operator`: runs the operator (see spotrun_operator.cli)."""

from spotrun_operator.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
