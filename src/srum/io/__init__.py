"""Files srum reads and writes: crash-safe JSONL."""
