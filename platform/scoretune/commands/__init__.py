"""One module per ``scoretune`` subcommand (see :mod:`scoretune.cli`)."""
