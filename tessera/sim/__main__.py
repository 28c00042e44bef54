"""``python -m tessera.sim ...`` runs ``tessera sim ...``."""

import sys

from .cli import sim_main

if __name__ == "__main__":
    sys.exit(sim_main(sys.argv[1:]))
