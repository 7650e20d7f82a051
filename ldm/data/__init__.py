"""Data: webdataset shards in the img2dataset layout, and the datasets that produce them.

- ``shards``   write (deterministic, atomic) / find / read tar shards
- ``images``   the one image/caption decoding every reader uses (modes, EXIF, alpha, size limit, UTF-8)
- ``webdata``  ``WebDataModule`` (Lightning) + ``ShardDataset``: batches ``{"image", "caption", "meta",
  "key", "skipped", "skip_reasons"}`` split by DDP rank and worker; ``log_skipped`` logs skipped inputs
- ``resumable`` / ``workers``  loaders whose position is checkpointed / whose workers leave preemption
  signals to the main process
- ``shapes``   the procedural default dataset (vocabularies, scenes, captions, ``eval_prompts``)
- ``folder``   your images + captions → shards;  ``openmoji``  OpenMoji emoji → shards
- ``bench``    loader throughput (``ldm bench data``)

Submodules are imported explicitly (``from ldm.data.webdata import WebDataModule``) so that importing
``ldm.data.shapes`` does not pull in Lightning.
"""
