"""The `propeller-fl` command line: one argparse tree, each group of commands in its module.
Entry points: the `propeller-fl` console script, or `python -m server.cli`."""
