"""Benchmarks: ``python -m tests.bench [NAME …]`` (``just bench``) runs ``bench_<NAME>.main()``."""
