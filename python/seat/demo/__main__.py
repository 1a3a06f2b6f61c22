import sys

from .ops_tour import main

sys.exit(main())
