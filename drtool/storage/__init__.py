"""The primary's on-disk model of a volume: device I/O, region maps, the state directory."""
