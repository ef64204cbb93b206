import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests run on CPU with one thread per process, so parallel processes in a test do not oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")
