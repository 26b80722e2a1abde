"""Tools over whole trajectories.

- :mod:`.safetensors_layout`: export to and import from the notebook's single-safetensors layout;
- :mod:`.convert`: rewriting a store in another profile or format;
- :mod:`.stitch`: joining runs;
- :mod:`.scalars`: the 0-d kinds as TensorBoard scalars;
- :mod:`.token_sets`: token sets from ids or a mask file.
"""
