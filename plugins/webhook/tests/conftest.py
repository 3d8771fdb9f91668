"""Make the plugin importable from a source checkout (it is a flat module beside this folder)."""

import sys
from pathlib import Path

PLUGIN_DIR = str(Path(__file__).resolve().parent.parent)
if PLUGIN_DIR not in sys.path:
    sys.path.insert(0, PLUGIN_DIR)
