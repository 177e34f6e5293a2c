"""The API's pure parts: request validation, parameter mapping, error mapping, monitor state."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from corolla.engine import CacheFullError, MissingBlocksError, PeerUnavailableError, ProtocolError
from corolla.engine.apps.api import protocol
from corolla.engine.apps.api.errors import APIError, error_for
from corolla.engine.apps.monitor.state import model_state, swarm_state
from corolla.engine.dht.records import ServerRecord, ServerState

pytestmark = pytest.mark.timeout(60)


def chat(**fields: object) -> protocol.ChatCompletionRequest:
    return protocol.ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_greedy_when_temperature_is_zero_and_sampling_otherwise() -> None:
    greedy = protocol.chat_options(chat(temperature=0, top_p=0.5, seed=3, max_tokens=7))
    assert (greedy.sampling.do_sample, greedy.max_tokens, greedy.sampling.seed, greedy.sampling.top_p) == (
        False,
        7,
        3,
        0.5,
    )
    sampled = protocol.chat_options(chat(temperature=0.7, stop="\n"))
    assert sampled.sampling.do_sample and sampled.sampling.temperature == 0.7 and sampled.stop == ("\n",)
    assert protocol.chat_options(chat()).sampling.do_sample  # OpenAI's default temperature is 1
    assert protocol.chat_options(chat(max_completion_tokens=5, max_tokens=9)).max_tokens == 5
    kwargs = greedy.stream_kwargs(7)
    assert kwargs["max_new_tokens"] == 7 and kwargs["sampling"].do_sample is False


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1}, "frequency_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_unsupported_parameters_get_a_400_naming_them(fields: dict[str, object], param: str) -> None:
    with pytest.raises(APIError) as info:
        protocol.chat_options(chat(**fields))
    assert info.value.status == 400 and info.value.param == param
    assert info.value.body()["error"]["param"] == param


def test_zero_penalties_and_n_1_are_accepted() -> None:
    protocol.chat_options(chat(n=1, presence_penalty=0, frequency_penalty=0.0))


@pytest.mark.parametrize(
    "fields", [{"temperature": 3}, {"top_p": 0}, {"max_tokens": 0}, {"messages": []}, {"seed": 2**70}, {"top_k": -1}]
)
def test_out_of_range_values_are_invalid(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        chat(**fields)


def test_message_content_parts_are_joined_and_images_refused() -> None:
    request = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]
    )
    assert protocol.chat_messages(request) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]
    with pytest.raises(APIError, match="image_url"):
        protocol.chat_messages(chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]))


def test_text_completion_defaults_and_refusals() -> None:
    request = protocol.CompletionRequest.model_validate({"model": "m", "prompt": ["once"]})
    assert protocol.prompt_text(request) == "once"
    assert protocol.completion_options(request).max_tokens == 16  # OpenAI's default
    two = protocol.CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]})
    with pytest.raises(APIError, match="exactly one prompt"):
        protocol.prompt_text(two)
    for field, value in (("echo", True), ("suffix", "x"), ("best_of", 3), ("logprobs", 2)):
        bad = protocol.CompletionRequest.model_validate({"model": "m", "prompt": "a", field: value})
        with pytest.raises(APIError) as info:
            protocol.completion_options(bad)
        assert info.value.param == field


def test_corolla_errors_map_to_openai_status_codes() -> None:
    assert error_for(CacheFullError("full")).status == 429
    missing = error_for(MissingBlocksError("m", [3, 4, 5]))
    assert missing.status == 503 and "3:6" in missing.message and missing.code == "missing_blocks"
    assert error_for(TimeoutError()).status == 504
    assert error_for(PeerUnavailableError("…abc", "no answer within 2.0 s")).status == 504
    assert error_for(ProtocolError("bad bytes")).status == 502
    assert error_for(ValueError("bad")).status == 400
    assert error_for(RuntimeError("boom")).status == 500
    shape = error_for(CacheFullError("full")).body()["error"]
    assert set(shape) == {"message", "type", "param", "code"}


def test_finish_reasons_and_chunks_follow_openai() -> None:
    assert [protocol.finish_reason(r) for r in ("eos", "stop", "length")] == ["stop", "stop", "length"]
    chunk = protocol.chat_chunk("id", "m", {"content": "x"})
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["finish_reason"] is None
    done = protocol.usage_chunk("id", "m", "chat.completion.chunk", 3, 4)
    assert done["choices"] == [] and done["usage"]["total_tokens"] == 7


def record(start: int, end: int, state: ServerState = ServerState.ONLINE, **extra: object) -> ServerRecord:
    return ServerRecord(state=state, start=start, end=end, throughput=12.5, cache_tokens_left=100, **extra)  # type: ignore[arg-type]


def test_monitor_state_counts_online_servers_per_block_and_names_missing_ones() -> None:
    a, b, c = record(0, 3, public_name="alice"), record(0, 2), record(2, 4, ServerState.OFFLINE)
    records = {
        0: {"pa": a, "pb": b},
        1: {"pa": a, "pb": b},
        2: {"pa": a, "pc": c},
        3: {"pc": c},
    }
    state = model_state("m", 5, records)
    assert state["servers_per_block"] == [2, 2, 1, 0, 0]
    assert state["missing_blocks"] == [3, 4] and state["missing"] == "3:5" and not state["healthy"]
    rows = {s["peer_id"]: s for s in state["servers"]}
    assert rows["pa"]["public_name"] == "alice" and rows["pa"]["state"] == "online"
    assert rows["pc"]["state"] == "offline" and rows["pa"]["tokens_served"] == 0  # each record's own count
    doc = swarm_state({"m": state}, 1.0, 5.0, None)
    assert doc["healthy"] is False and doc["models"][0]["name"] == "m"
    healthy = model_state("m", 2, {0: {"pb": b}, 1: {"pb": b}})
    assert swarm_state({"m": healthy}, 1.0, 5.0, None)["healthy"] is True
    assert swarm_state({}, 1.0, 5.0, None)["healthy"] is False  # nothing announced is not healthy


@pytest.mark.parametrize("command", [["api", "some/model"], ["monitor"]])
def test_web_commands_say_what_is_missing(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from corolla.engine.apps.cli import main

    monkeypatch.delenv("COROLLA_INITIAL_PEERS", raising=False)
    assert main(command) == 2
    assert "COROLLA_INITIAL_PEERS" in capsys.readouterr().err


def test_no_route_after_timeouts_is_504_and_otherwise_503() -> None:
    from corolla.engine.apps.api.errors import error_for
    from corolla.engine.errors import NoRouteError, PeerUnavailableError

    try:
        try:
            raise PeerUnavailableError("12D3KooWabc", "no answer within 3.0 s")
        except PeerUnavailableError as e:
            raise NoRouteError("m", [0, 1], ["12D3KooWabc"]) from e
    except NoRouteError as e:
        timed_out = error_for(e)
    assert (timed_out.status, timed_out.code) == (504, "swarm_timeout")
    refused = error_for(NoRouteError("m", [0, 1], ["12D3KooWabc"]))
    assert (refused.status, refused.code) == (503, "no_route")


def test_a_body_that_is_not_json_names_what_and_where_with_no_param() -> None:
    error = protocol.invalid_request(
        [{"type": "json_invalid", "loc": ("body", 58), "msg": "JSON decode error", "ctx": {"error": "Expecting ','"}}]
    )
    body = error.body()["error"]
    assert error.status == 400 and body["param"] is None and body["code"] == "invalid_json"
    assert body["message"] == "The request body is not valid JSON: Expecting ',' at character 58. Send a JSON object."


def test_a_bad_field_is_named_as_param() -> None:
    error = protocol.invalid_request([{"type": "greater_than_equal", "loc": ("body", "max_tokens"), "msg": "bad"}])
    assert error.param == "max_tokens" and error.message == "Invalid request: max_tokens: bad"


@pytest.mark.parametrize(
    "fields",
    [
        {"default_max_tokens": 0},
        {"max_sessions": 0},
        {"request_timeout": -1.0},
        {"max_workers": 0},
        {"max_queue": -1},
        {"max_body_bytes": 10},
    ],
)
def test_api_settings_are_bounded(fields: dict[str, object]) -> None:
    from corolla.engine.apps.api.app import ApiSettings

    with pytest.raises(ValueError, match="must be"):
        ApiSettings(model_id="m", **fields)  # type: ignore[arg-type]


def test_install_hints_match_the_readme() -> None:
    from pathlib import Path

    from corolla.engine.errors import install_hint, missing_extra

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert install_hint("api") in readme and install_hint("langchain") in readme
    assert missing_extra("`corolla api`", "api", "uvicorn") == (
        '`corolla api` needs the api extra: pip install -c constraints.txt -e ".[api]" (uvicorn is missing)'
    )


@pytest.mark.parametrize(
    ("script", "module"), [("langchain_chain.py", "langchain_core"), ("llama_index_query.py", "llama_index")]
)
def test_examples_without_their_extra_say_how_to_install_it(script: str, module: str) -> None:
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).parents[2] / "examples" / script
    hide = f"import runpy, sys; sys.modules[{module!r}] = None; runpy.run_path({str(path)!r}, run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f'examples/{script} needs the examples extra: pip install -c constraints.txt -e ".[examples]" '
        f"({module} is missing)"
    )
