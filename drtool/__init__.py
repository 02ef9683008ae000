"""drtool: keep a damaged block volume serving correct data, then bring it back cheaply."""

__version__ = "0.1.0"
