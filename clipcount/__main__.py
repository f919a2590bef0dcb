import sys

from clipcount.cli import main

sys.exit(main())
