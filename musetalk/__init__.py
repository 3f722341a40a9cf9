"""MuseTalk Studio: run the MuseTalk lip-sync model locally (MPS, CUDA, CPU), stage by stage or streaming.

Importing this package has no side effects: no weights are loaded, no torch flags are set.
"""

__version__ = "0.1.0"
