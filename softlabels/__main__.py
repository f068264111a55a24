"""``python -m softlabels`` runs the CLI."""

from .cli import main

main()
