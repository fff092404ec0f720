import sys

from megadistill.cli import main

sys.exit(main())
