import sys

from latticed.main import main

sys.exit(main())
