"""One module per `rung` subcommand."""
