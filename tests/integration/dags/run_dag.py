"""Run one DAG from a file with dag.test(): ``python run_dag.py FILE DAG_ID [CONF_JSON]``.

Prints ``DAGRUN_STATE=<state>`` and exits 0 only on success.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

if __name__ == "__main__":
    path, dag_id = sys.argv[1], sys.argv[2]
    # dag.test() serializes the DAG from the configured bundle: make it this file's folder.
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = os.path.dirname(os.path.abspath(path))
    conf = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
    spec = importlib.util.spec_from_file_location("dag_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from airflow.sdk import DAG

    dags = [v for v in vars(module).values() if isinstance(v, DAG) and v.dag_id == dag_id]
    if not dags:
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder=path)
        if dag_id not in bag.dags:
            sys.exit(f"{dag_id} not found in {path}: {bag.import_errors}")
        dags = [bag.dags[dag_id]]
    run = dags[0].test(run_conf=conf)
    print(f"DAGRUN_STATE={run.state}")
    sys.exit(0 if str(run.state).endswith("success") else 1)
