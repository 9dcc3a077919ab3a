import sys

from tests.mutate.run import main

sys.exit(main())
