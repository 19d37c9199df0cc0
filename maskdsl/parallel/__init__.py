"""Context parallelism: md.context_parallel, md.shard, md.unshard and their plans."""
