"""Speed benchmarks. Each ``ldm.bench.<name>`` has ``run(...) -> dict`` and a ``python -m`` entry point
that prints a table and writes JSON under ``checkpoints/bench/``. Timings are only comparable
within one run (the CPU is shared), so every benchmark measures its reference in the same run."""
