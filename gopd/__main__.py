import sys

from gopd.cli import main

sys.exit(main())
