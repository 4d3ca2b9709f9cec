import sys

from lazydp.cli import main

sys.exit(main())
