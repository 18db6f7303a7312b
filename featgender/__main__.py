"""``python -m featgender`` runs the CLI (also under torchrun)."""

from featgender.cli import main

main()
