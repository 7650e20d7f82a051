"""Speed benchmarks. Each ``ldm.bench.<name>`` has ``benchmark(...) -> dict`` (JSON-ready) and ``format_table``;
``ldm bench <name>`` prints the table and writes the JSON under ``checkpoints/bench/``. Timings are only
comparable within one run (the CPU is shared), so every benchmark measures its reference in the same run."""
