"""modelzoo: Llama-family models for dataflow accelerators.

Framework code lives here (config, backends, checkpoint, ...); model code lives in
``modelzoo.models`` (source dir ``models/``) and data preparation in ``modelzoo.data_prep``.
"""

__version__ = "0.1.0"
