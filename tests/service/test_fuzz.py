"""Fuzz the OpenAPI schema with schemathesis (bounded examples): no request gets a 5xx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from service.settings import Settings  # noqa: E402
from tests.service.conftest import live_server  # noqa: E402


def test_no_request_gets_a_5xx(rm_dir: Path) -> None:
    seen: dict[str, int] = {}
    with live_server(Settings(model=str(rm_dir), max_responses=16, max_chars=2000)) as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        ops = [r.ok() for r in schema.get_all_operations()]
        assert {f"{op.method.upper()} {op.path}" for op in ops} >= {
            "POST /v1/score",
            "POST /v1/rank",
            "POST /v1/rerank",
            "POST /get_reward",
            "GET /v1/models",
        }
        for op in ops:

            @given(case=op.as_strategy())
            @settings(
                max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
            )
            def check(case: Any) -> None:
                response = case.call(base_url=url, timeout=30)
                key = f"{case.method} {case.path} {response.status_code}"
                seen[key] = seen.get(key, 0) + 1
                assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
                if response.status_code >= 400:
                    err = response.json()["error"]
                    assert err["message"] and err["type"]

            check()
    assert sum(seen.values()) >= 50
    assert any(k.endswith(" 200") for k in seen)
