"""One module per benchmark; each exposes `add_arguments(parser)` and `run(args) -> (rows, columns, settings)`."""
