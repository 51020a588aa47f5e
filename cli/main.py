"""Entry point of the ``fasttrunc`` command: the apps plus every command module."""

from fasttrunc.cli import bench, bench_svd, memory, pythia, recall, sweep  # noqa: F401  (each registers its commands)
from fasttrunc.cli.apps import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
