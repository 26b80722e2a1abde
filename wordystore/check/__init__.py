"""Checking a store: imports no writer.

- :mod:`.store_scan`: one checking pass over every document, chunk, step, token set and state;
- :mod:`.repair`: rebuilt documents and a commit record from a salvage scan;
- :mod:`.verification`: ``verify()`` and ``VerifyReport``.
"""
