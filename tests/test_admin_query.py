"""``GET /admin/routes``'s query and ``interlock routes``' flags: bad values are clear errors."""

from __future__ import annotations

import pytest

from backends.errors import InvalidRequest
from gateway.admin_query import AdminRoutesQuery, parse_admin_query
from gateway.cli import main
from policies.base import RequestFacts


def test_no_parameters_give_the_typical_request() -> None:
    assert parse_admin_query({}) == RequestFacts(prompt_tokens=500, max_tokens=256, ttft_budget_ms=None)


def test_values_are_parsed_from_the_query_strings() -> None:
    facts = parse_admin_query(
        {"prompt_tokens": "0", "max_tokens": "10000000", "ttft_ms": "12.5", "unknown": "ignored"}
    )
    assert facts == RequestFacts(prompt_tokens=0, max_tokens=10_000_000, ttft_budget_ms=12.5)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"max_tokens": "99999999999999999999"}, "max_tokens"),
        ({"max_tokens": "0"}, "max_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"max_tokens": ""}, "max_tokens"),
        ({"prompt_tokens": "-1"}, "prompt_tokens"),
        ({"prompt_tokens": "10000001"}, "prompt_tokens"),
        ({"prompt_tokens": "1e400"}, "prompt_tokens"),
        ({"ttft_ms": "0"}, "ttft_ms"),
        ({"ttft_ms": "-5"}, "ttft_ms"),
        ({"ttft_ms": "3600000"}, "ttft_ms"),
        ({"ttft_ms": "nan"}, "ttft_ms"),
        ({"ttft_ms": "inf"}, "ttft_ms"),
        ({"ttft_ms": "soon"}, "ttft_ms"),
    ],
)
def test_a_bad_value_is_an_invalid_request_naming_its_parameter(params: dict[str, str], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_admin_query(params)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert param in caught.value.message
    assert caught.value.to_dict()["type"] == "invalid_request_error"


def test_the_model_is_frozen_and_typed() -> None:
    query = AdminRoutesQuery.model_validate({"max_tokens": "7"})
    assert query.max_tokens == 7 and query.ttft_ms is None


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--max-tokens", "99999999999999999999"], "--max-tokens"),
        (["--prompt-tokens", "-3"], "--prompt-tokens"),
        (["--ttft-ms", "nan"], "--ttft-ms"),
        (["--url", "not-a-url"], "--url"),
    ],
)
def test_interlock_routes_refuses_bad_flags_without_a_traceback(
    flags: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["routes", *flags])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("interlock: ") and says in err and "Traceback" not in err


def test_admin_routes_rejects_an_out_of_range_parameter_with_a_400() -> None:
    from tests.conftest import run_gateway
    from tests.fakes import FakeUpstream, openai_backend

    with (
        FakeUpstream() as fake,
        run_gateway(
            {"backends": {"up": openai_backend(fake.base_url)}, "models": {"m": {"targets": ["up"]}}}
        ) as url,
    ):
        import httpx

        response = httpx.get(url + "/admin/routes?max_tokens=99999999999999999999", timeout=5)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "max_tokens"
        assert httpx.get(url + "/admin/routes?prompt_tokens=10", timeout=5).status_code == 200
