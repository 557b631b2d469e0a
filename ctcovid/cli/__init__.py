"""The command line, the top floor: one thin Typer module per command, composing what is below."""
