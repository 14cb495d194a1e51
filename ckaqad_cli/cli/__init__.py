"""Typer commands: one thin module per subcommand, each turning options into a stage call."""
