"""Native (cffi) data path of the software transport."""
