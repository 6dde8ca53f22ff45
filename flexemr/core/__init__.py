"""The pure layer of flexemr: numpy and the native kernel only, no I/O (plans, splitting, pooling math and its
kernel, codecs, the row cache)."""
