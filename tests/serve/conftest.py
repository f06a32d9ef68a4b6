"""Makes the serve tests' helpers (servers.py) importable in any pytest import mode."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
