"""One module per benchmark of `python -m launch.bench NAME`; each exposes `add_arguments(parser)`
and `run(args) -> (rows, columns, settings)`, and states threads and load.

May import: everything (the top layer). `common` holds what several share; launch/bench.py
imports a benchmark only when its subcommand runs.
"""
