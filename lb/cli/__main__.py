import sys

from lb.cli.main import main

sys.exit(main())
