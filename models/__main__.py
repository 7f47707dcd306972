"""`python -m ltkernels.models ...` is `ltk ...`."""
import sys

from .cli import main

sys.exit(main())
