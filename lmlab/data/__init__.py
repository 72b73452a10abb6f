"""Data: the dataset registry, the synthetic corpus, corpus cleaning and dedup, token shards."""
