"""``python -m dazoo`` runs the command line."""
import sys

from dazoo.cli import main

sys.exit(main())
