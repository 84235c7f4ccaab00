import sys

from samadapt.cli import main

sys.exit(main())
