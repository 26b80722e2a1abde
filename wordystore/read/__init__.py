"""The read path: never imports the writer, verify or the analyses.

- :mod:`.trajectory`: :class:`~wordystore.read.trajectory.Trajectory` and ``KindView``, the user's face;
- :mod:`.indexing`: numpy indexing as a plan computed without I/O;
- :mod:`.reading`: the store's rows in two tiers, chunk fetch, check, decode and cache;
- :mod:`.display`: ``wordystore info`` and the notebook's HTML;
- :mod:`.xarray_backend`: ``xr.open_dataset(path, engine="wordystore")``.
"""
