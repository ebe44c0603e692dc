"""The expert store: the format on disk (``format``), conversion from a checkpoint (``pack``) and
where a model comes from (``source``: a store directory or the embedded demo). Standard library and
NumPy only, so that ``flashmoe verify`` and ``flashmoe --help`` stay fast."""
