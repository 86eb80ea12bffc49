"""`python -m duoserve.loadtest ...` runs `duoserve bench ...`."""
import sys

from duoserve.loadtest.cli import main

sys.exit(main())
