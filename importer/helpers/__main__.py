"""``python -m importer.helpers FD``: a sync's helper process (see `importer.helpers.child`)."""

import sys

from importer.helpers.child import main

sys.exit(main())
