"""Data: record schema, tokenizer, the embedded shapes dataset, shard writer, Grain pipeline."""
