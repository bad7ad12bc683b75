"""`python -m diffusion_policy.cli VERB ...` (what torchrun runs)."""

import sys

from diffusion_policy.cli.main import main

sys.exit(main())
