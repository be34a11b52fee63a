"""The E2E harness's failure paths (no Airflow needed). Its success path, a real stack running a
deferring DAG and stopping cleanly, is ``tests/e2e/smoke.py``, run as the last test of
tests/e2e/test_refresh_concurrency.py on that module's stack."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.e2e.harness import HarnessError, open_and_click, redact_url, redact_urls_in
from tests.e2e.smoke import consent_server

if TYPE_CHECKING:
    from pathlib import Path

    from playwright.sync_api import Browser


def test_open_and_click_failure_names_a_screenshot(browser: Browser, tmp_path: Path) -> None:
    with consent_server("http://127.0.0.1:9/never") as consent_url:
        with pytest.raises(HarnessError) as failure:
            open_and_click(
                browser,
                consent_url,
                "#no-such-button",
                wait_for_url_prefix="http://127.0.0.1:9/",
                timeout=2,
                screenshot_dir=tmp_path,
            )
    message = str(failure.value)
    assert "click #no-such-button" in message and "Allow access?" in message
    shots = list(tmp_path.glob("browser-failure-*.png"))
    assert len(shots) == 1 and str(shots[0]) in message and shots[0].stat().st_size > 0


def test_failure_messages_redact_query_values() -> None:
    url = "http://127.0.0.1:8080/papertrail/callback?code=c0de-value&state=st4te&error=access_denied"
    assert redact_url(url) == "http://127.0.0.1:8080/papertrail/callback?code=***&state=***&error=access_denied"
    text = redact_urls_in(f'navigated to "{url}"\nthen https://x.example/a?token=t0k')
    assert "c0de-value" not in text and "st4te" not in text and "t0k" not in text and "access_denied" in text
