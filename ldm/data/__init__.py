"""Data: webdataset shards in the img2dataset layout, and the datasets that produce them.

- ``shards``   write (deterministic, atomic) / find / read tar shards
- ``webdata``  ``WebDataModule`` (Lightning) + ``ShardDataset``: batches ``{"image", "caption", "meta",
  "key", "skipped"}`` split by DDP rank and worker; ``log_skipped`` logs skipped bad inputs
- ``shapes``   the procedural default dataset (vocabularies, scenes, captions, ``eval_prompts``)
- ``folder``   your images + captions → shards;  ``openmoji``  OpenMoji emoji → shards
- ``bench``    loader throughput (``ldm bench data``)

Submodules are imported explicitly (``from ldm.data.webdata import WebDataModule``) so that importing
``ldm.data.shapes`` does not pull in Lightning.
"""
