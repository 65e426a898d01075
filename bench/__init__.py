"""Side-by-side benchmark of splicelb against HAProxy: ``python bench/run.py``."""
