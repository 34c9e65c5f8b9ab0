"""WebDataset shards: written (writer, cli), read (reader), checked against manifest.json (manifest)."""
