"""pure compute, no I/O"""
