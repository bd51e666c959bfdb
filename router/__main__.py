"""`python -m router` is the same as the `event-router` console script."""

from router.cli import main

main()
