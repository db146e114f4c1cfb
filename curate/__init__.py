"""curate: web-scale image-text URL lists -> curated, deduplicated training shards."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # the Python API (curate/api.py), imported on first use so `import curate` stays light
    if name in ("Pipeline", "run_stage"):
        from curate import api

        return getattr(api, name)
    if name == "run_yaml":
        from curate import pipeline

        return pipeline.run_yaml
    raise AttributeError(f"module 'curate' has no attribute {name!r}")
