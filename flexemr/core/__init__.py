"""The pure layer of flexemr: numpy only, no I/O (plans, splitting, pooling math, codecs, the row cache)."""
