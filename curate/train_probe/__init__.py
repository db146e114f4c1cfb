"""train-probe: train small CLIP models on dataset subsets at equal samples seen and measure their quality.

data.py loads shards into memory, train.py trains one (subset, seed) run, evaluate.py computes zero-shot and
retrieval metrics, report.py writes results.json, results.md and the plots, run.py drives the experiment.
"""
