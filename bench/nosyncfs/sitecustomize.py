"""Benchmark only: put this folder on PYTHONPATH to run the streamer without the group
``syncfs`` before its commits (the renames still happen; the data is not forced to disk), so
`speed_bench.py --without-syncfs` can show what durability costs. Never a setting of the
service: an artifact committed this way can be lost, whole or in part, at a power cut."""

import store.batches

store.batches._flushed = lambda path: True
