"""The embedding server: shards in registered memory, metadata, the pooling service."""
