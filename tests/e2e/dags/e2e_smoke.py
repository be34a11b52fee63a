"""E2E smoke DAG: an XCom, a deferral through the triggerer (resumed on a worker), a printed line."""

from __future__ import annotations

from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync
from airflow.sdk import dag, task

PAYLOAD = {"answer": 42, "words": ["e2e", "smoke"]}
MARKER = "e2e-smoke-marker: report ran"


@dag(dag_id="e2e_smoke", schedule=None, catchup=False, tags=["e2e"])
def e2e_smoke() -> None:
    @task
    def produce() -> dict:
        return PAYLOAD

    # target_time is rendered when the task starts, so the sensor always defers for ~3 s
    # (TimeDeltaSensor counts from run_after and may not defer at all once scheduling took 3 s).
    wait = DateTimeSensorAsync(
        task_id="wait_deferred",
        target_time="{{ (macros.datetime.utcnow() + macros.timedelta(seconds=3)).isoformat() }}",
    )

    @task
    def report(payload: dict) -> None:
        print(f"{MARKER} answer={payload['answer']}")

    produced = produce()
    produced >> wait >> report(produced)  # type: ignore[arg-type]  # an XComArg at parse time


e2e_smoke()
