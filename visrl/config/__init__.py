"""Entry-point plumbing of ``run.py``: the config schema, run/sweep directory names, expected-error types.

Kept import-light (no torch at import time) so that a bad config value or an unwritable run directory is
reported within seconds, before any model or data is built. Imports nothing from visrl at module level.
"""
