"""``python -m medgemma_lib`` entry point."""

from medgemma_lib.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
