"""The single-process engine: sequences, KV block accounting, scheduling, model running."""
