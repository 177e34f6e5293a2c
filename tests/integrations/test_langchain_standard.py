"""LangChain's standard integration suite for ChatCorolla, against a live loopback swarm."""

from __future__ import annotations

from typing import Any

import pytest
from corolla_swarm import SwarmModel
from langchain_tests.integration_tests import ChatModelIntegrationTests

from corolla.integrations.langchain import ChatCorolla

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

_swarm: SwarmModel | None = None


@pytest.fixture(autouse=True)
def _use_swarm(corolla_swarm: SwarmModel) -> None:
    """Properties cannot take fixtures: hand the swarm's address to `chat_model_params`."""
    global _swarm
    _swarm = corolla_swarm


class TestChatCorollaStandard(ChatModelIntegrationTests):
    """Unsupported features are declared through the suite's own properties."""

    @property
    def chat_model_class(self) -> type[ChatCorolla]:
        return ChatCorolla

    @property
    def chat_model_params(self) -> dict[str, Any]:
        assert _swarm is not None
        # Few tokens keep the suite fast on CPU (~15 tokens/s); every test only needs some text.
        return {"model": _swarm.model, "initial_peers": _swarm.initial_peers, "max_tokens": 10}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # the test swarm serves a single model
