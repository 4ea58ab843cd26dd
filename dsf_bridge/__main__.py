"""``python -m dsf_bridge`` runs the command line."""

from dsf_bridge.cli import main

main()
