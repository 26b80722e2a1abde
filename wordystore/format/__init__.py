"""The format itself, pure and without I/O: what docs/format.md specifies, each fact once.

- :mod:`.keys`: key names, the names a kind may take, limits on what a document may claim;
- :mod:`.layout`: profiles and array layouts (shards, chunks, codecs);
- :mod:`.metadata`: the metadata document and the checks of arrays against it;
- :mod:`.records`: the commit record, the tier rule, the writer lease's record;
- :mod:`.codecs`: the codecs, the shard index and binding record;
- :mod:`.prediction`: the optimizer's replays (predicted kinds);
- :mod:`.kinds`: kinds and the one dtype table;
- :mod:`.bfloat16`: zarr's ``"bfloat16"`` data type (registered by ``import wordystore``).
"""
