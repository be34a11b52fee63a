"""Example DAGs shipped with the provider (identical to the repository's ``dags/``).

Copy them into your DAGs folder from the installed package::

    python -m airflow_papertrail.example_dags "$AIRFLOW_HOME/dags"

The package itself is never a DAGs folder: Airflow only parses what you copy.
"""

from __future__ import annotations

from pathlib import Path

#: The example DAG files, in the order a new user runs them.
EXAMPLE_DAGS = (
    "papertrail_authorize.py",
    "papertrail_query.py",
    "papertrail_extract.py",
    "papertrail_extract_many.py",
    "papertrail_grant_health.py",
)


def example_dag_paths() -> list[Path]:
    """Paths of the example DAG files inside the installed package."""
    here = Path(__file__).resolve().parent
    return [here / name for name in EXAMPLE_DAGS]
