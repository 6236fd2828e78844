"""``python -m reaper`` runs the command line."""

from reaper.cli import main

main()
