import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Tests run on CPU with one thread per process, so parallel processes in a test do not oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")
