"""``python -m airflow_papertrail.example_dags DEST``: copy the example DAGs into DEST."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from airflow_papertrail.example_dags import EXAMPLE_DAGS, example_dag_paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_papertrail.example_dags",
        description="Copy the provider's example DAGs (" + ", ".join(EXAMPLE_DAGS) + ") into your DAGs folder.",
    )
    parser.add_argument("dest", type=Path, help="your DAGs folder, e.g. $AIRFLOW_HOME/dags")
    parser.add_argument("--force", action="store_true", help="overwrite files that already exist there")
    args = parser.parse_args(argv)
    dest: Path = args.dest
    if dest.exists() and not dest.is_dir():
        parser.error(f"{dest} is not a directory")
    existing = [p.name for p in example_dag_paths() if (dest / p.name).exists()]
    if existing and not args.force:
        print(
            f"not copying: {', '.join(existing)} already in {dest} (nothing was changed); "
            "pass --force to overwrite them",
            file=sys.stderr,
        )
        return 1
    dest.mkdir(parents=True, exist_ok=True)
    for path in example_dag_paths():
        shutil.copyfile(path, dest / path.name)
        print(dest / path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
