"""The write path.

- :mod:`.start`: ``create``, ``resume`` and a store built aside (convert, import, stitch);
- :mod:`.writer`: ``TrajectoryWriter``, checking appends and filling the ring;
- :mod:`.committer`: the ring, block writes, commits and compaction on background threads;
- :mod:`.child_process`: the same committer in a spawned child process;
- :mod:`.compaction`: encoding rows into shards.
"""
