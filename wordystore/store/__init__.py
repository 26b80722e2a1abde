"""Where a store's bytes live, below the writer and the reader.

- :mod:`.storage`: a store from a path or URL, bytes in and out, fsync; nothing leaves the store;
- :mod:`.objectstore`: ``s3://``, ``gs://``, ``az://`` URLs, credentials, fenced writes;
- :mod:`.lease`: the single writer (a directory's ``flock``, an object store's lease);
- :mod:`.json_documents`: reading and writing the store's JSON documents;
- :mod:`.resume_state`: the resume-state record (a safetensors file per state).
"""
