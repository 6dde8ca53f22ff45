"""FlexEMR benchmarks: ``python -m flexemr.bench <command> [--json]``.

Commands are entries of :data:`flexemr.bench.__main__.COMMANDS`:

``lookup``
    two embedding servers on loopback (separate processes), 26 tables, a
    2048-sample batch with pooling factor 20 and Zipf ids; rows/s, bytes and
    sub-requests per batch for a naive path (one read per id), flexemr with
    coalescing, and a local numpy gather (:mod:`flexemr.bench._lookup`).

Nothing here is a test: numbers vary with the machine and its load.
"""
