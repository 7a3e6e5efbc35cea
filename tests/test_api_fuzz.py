"""Schemathesis against the server's own OpenAPI schema: whatever it generates, no 5xx.

Driven through hypothesis directly (schemathesis' pytest plugin does not run under pytest 9)."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

pytest.register_assert_rewrite("api_fixtures")
from api_fixtures import API_KEY  # noqa: E402

pytest_plugins = ["api_fixtures"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.mark.slow
def test_no_server_errors(api_server, http):
    schema = schemathesis.openapi.from_url(f"{api_server}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:
            case.call_and_validate(base_url=api_server, headers=AUTH, checks=[not_a_server_error], timeout=120)

        check()
    assert http.get("/health").status_code == 200
