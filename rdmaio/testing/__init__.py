"""Testing helpers for rdmaio: a Soft-RoCE VM runner and in-guest verbs/perftest checks."""
