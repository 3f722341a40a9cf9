import sys

from musetalk.frontends.cli import main

sys.exit(main())
