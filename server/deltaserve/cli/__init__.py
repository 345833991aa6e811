"""Command-line entry points (`deltaserve <command>`)."""
