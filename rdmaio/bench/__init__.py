"""``python -m rdmaio.bench``: rdmaio's numbers next to its peers', in one run.

See :mod:`rdmaio.bench.__main__` for the command line and ``docs/performance.md``
for measured results.
"""
