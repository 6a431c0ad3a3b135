"""`python -m data_prep.synthetic`: see data_prep.synthetic."""

import sys

from data_prep.synthetic import main

sys.exit(main())
