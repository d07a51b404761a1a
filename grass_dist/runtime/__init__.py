"""Ray runtime: cluster connection, gradient workers, shard scheduling, the reducer."""
