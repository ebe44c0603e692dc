"""Generation: ``params`` (what a caller asks for and gets back), ``loop`` (prompt encoding and the
token stream), ``prompt_cache`` (reused prefixes; ``prompt_files``: the same on disk), ``stats``
(what the run cost) and ``aio``."""
