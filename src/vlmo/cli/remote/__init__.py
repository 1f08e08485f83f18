"""The command line as a client: of a resident model process that keeps a model loaded between commands
(`resident`, `process`, `runtime`, `identity`), and of any `vlmo serve` by URL (`client`). docs/resident.md tells
the user's side; `vlmo.cli.answering` picks which one answers a command.
"""
