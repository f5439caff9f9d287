"""`python -m fedtune.cli`, as the tests and the site daemon's worker start it."""

from fedtune.cli import main

main()
