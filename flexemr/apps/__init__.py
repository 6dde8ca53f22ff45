"""Applications on top of flexemr: the command line, LocalCluster, the demo, the ranker, DLRM, data sets."""
