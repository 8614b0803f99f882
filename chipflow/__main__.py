"""``python -m chipflow``: the CLI."""

from .cli import main

main()
