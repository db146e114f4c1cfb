"""Multimodal search over a scored dataset: a FAISS index over its embeddings (`curate index`), queries by
text, image or key (`curate search`) and a loopback search page (`curate serve`).

    index/                          written by the "index" stage
      plan.json                     kind, sizes and tasks of this build (its digest decides reuse)
      ids.parquet                   id -> key, shard, emb_row: hits map back to samples without ledgers
      trained-{modality}.faiss      the trained, empty index (IVF centroids; a Flat index needs none)
      parts/{shard}.{modality}.faiss  one shard's vectors added to a copy of the trained index (tasks)
      {modality}.faiss              all parts merged (finalize)
      rows.arrow, rows.json         id-ordered row store: what a hit shows, and its image's place in its tar
      allow/{digest}.npy            a --where clause evaluated once: one bit per id
      index.json                    kind, nprobe per modality and query kind, recall estimates; written last
"""
