"""`python -m ltkernels.models.benchmarking ...` is `ltk bench ...` (tools/gpu_validate.sh calls it this way)."""
import sys

from .cli import main

sys.exit(main())
