"""The ``fasttrunc`` command line (Typer): parse options, call fasttrunc, print or save."""
