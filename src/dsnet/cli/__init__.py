"""The ``dsnet`` console script: thin subcommands over library functions."""
