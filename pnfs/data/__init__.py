"""Data: readers, geometry, sharding, loaders and on-device targets."""
