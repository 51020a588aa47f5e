"""Entry point of the ``fasttrunc`` command: the apps plus every command module."""

from fasttrunc.cli import (  # noqa: F401  (each registers its commands)
    bench,
    bench_svd,
    export,
    memory,
    pythia,
    recall,
    sweep,
    targets,
)
from fasttrunc.cli.apps import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
