"""``python -m data_prep``: see data_prep/__init__.py."""
import os
import sys

from data_prep.cli import main

code = main()
# Everything is written, synced and closed by now.  Skip the interpreter's final garbage
# collection and deallocation of millions of vocabulary strings (seconds on big vocabularies).
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
