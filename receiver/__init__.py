"""intergiro-receiver: verified, deduplicated intake of Intergiro order callbacks onto RQ."""

__version__ = "0.1.0"
