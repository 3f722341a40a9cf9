import sys

from musetalk.cli import main

sys.exit(main())
