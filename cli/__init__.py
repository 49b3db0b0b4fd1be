"""Command-line entry points (typer). Only this package turns typed errors into exit codes."""
