import sys

from maskdsl.cli.main import main

sys.exit(main())
