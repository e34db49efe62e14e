"""``python -m edgeatp``: the command line (what ``torchrun -m edgeatp`` runs)."""

from .cli import main

main()
