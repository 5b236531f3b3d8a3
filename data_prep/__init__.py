"""jsonl/txt -> tokenized, packed, split, balanced HDF5 (the dataset contract in ARCHITECTURE.md).

Entry point: ``modelzoo-data-prep`` / ``python -m modelzoo.data_prep`` (see ``cli.py``).
Stages, one module each: ``input_files`` (find and read lines) -> ``shuffle`` -> ``splits``
(train/dev/test) -> ``articles`` (tokenize in ``workers``) -> ``packing`` -> ``hdf5_writer``
(+ metadata, manifest, atomic ``output_dir``); ``tokenize_pack`` streams lines through tokenizing
and packing, ``pipeline`` runs the jobs; ``verify`` re-checks a dataset dir.
"""
