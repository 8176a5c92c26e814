"""`python -m exporter`: see `exporter.cli`."""

from exporter.cli import main

if __name__ == "__main__":
    main()
