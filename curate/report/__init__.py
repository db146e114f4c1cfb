"""The HTML report (`curate report`) and curation accuracy against the demo web's ground truth."""
