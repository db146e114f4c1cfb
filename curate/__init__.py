"""curate: web-scale image-text URL lists -> curated, deduplicated training shards."""

__version__ = "0.1.0"
