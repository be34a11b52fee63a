"""When ``refresh_coordinator = auto`` may refresh on this machine (``refresh.local_fallback_refusal``):
only where every task runs on it. The integration test runs the rule through ``get_valid_token``
(tests/integration/test_refresh_coordinator.py); this one covers every sign, without Airflow."""

from __future__ import annotations

import pytest

from airflow_papertrail.refresh import local_fallback_refusal, remote_executors

LOCAL_URL = "http://127.0.0.1:8080/papertrail/token"


@pytest.mark.parametrize(
    ("setting", "remote"),
    [
        ("", []),
        ("LocalExecutor", []),
        ("=LocalExecutor", []),
        ("SequentialExecutor", []),
        ("CeleryExecutor", ["CeleryExecutor"]),
        (" LocalExecutor , CeleryExecutor ", ["CeleryExecutor"]),
        ("LocalExecutor;team_a=CeleryExecutor", ["CeleryExecutor"]),
        ("LocalExecutor;team_a=LocalExecutor", []),
        ("airflow.providers.cncf.kubernetes.executors.kubernetes_executor.KubernetesExecutor", ["KubernetesExecutor"]),
        ("edge:airflow.providers.edge3.executors.EdgeExecutor", ["EdgeExecutor"]),
        ("CeleryExecutor,CeleryExecutor", ["CeleryExecutor"]),
    ],
)
def test_remote_executors_reads_every_format_of_core_executor(setting, remote):
    assert remote_executors(setting) == remote


@pytest.mark.parametrize(
    "url",
    [
        LOCAL_URL,
        "http://localhost:8080/papertrail/token",
        "http://[::1]:8080/papertrail/token",
        "http://127.0.0.2:8080/papertrail/token",
        None,  # nothing configured (dag.test() on a laptop)
    ],
)
def test_one_machine_may_fall_back(monkeypatch, url):
    monkeypatch.delenv("AIRFLOW_IS_K8S_EXECUTOR_POD", raising=False)
    assert local_fallback_refusal("LocalExecutor", url) is None


def test_a_distributed_executor_refuses(monkeypatch):
    monkeypatch.delenv("AIRFLOW_IS_K8S_EXECUTOR_POD", raising=False)
    why = local_fallback_refusal("CeleryExecutor", LOCAL_URL)
    assert why == "[core] executor = CeleryExecutor may run tasks on several machines"


def test_a_kubernetes_executor_pod_refuses_whatever_its_executor_setting(monkeypatch):
    # The official chart's pod template sets AIRFLOW__CORE__EXECUTOR=LocalExecutor in task pods.
    monkeypatch.setenv("AIRFLOW_IS_K8S_EXECUTOR_POD", "True")
    why = local_fallback_refusal("LocalExecutor", LOCAL_URL)
    assert why is not None and "KubernetesExecutor pod" in why


@pytest.mark.parametrize("host", ["airflow-apiserver", "10.0.0.5", "api.example.invalid"])
def test_an_api_server_on_another_host_refuses(monkeypatch, host):
    monkeypatch.delenv("AIRFLOW_IS_K8S_EXECUTOR_POD", raising=False)
    why = local_fallback_refusal("LocalExecutor", f"http://{host}:8080/papertrail/token")
    assert why == f"the coordinator URL is on another machine ({host}), so this deployment has more than one"
