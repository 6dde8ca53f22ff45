"""Native (cffi) embedding kernel: fused gather + pooling over rows read in place (see :mod:`flexemr.core.kernel`)."""
