"""Footage: the episode format (manifest + shards), its resumable builder and the training windows (`footage`)."""
