"""The adapter-method registry (home of WaRA, SoKA and the like)."""

from __future__ import annotations

import pytest

from rankcut.adapters import ADAPTER_METHODS, get_adapter_method, register_adapter_method
from rankcut.errors import ConfigError


def test_adapter_registry_registers_and_refuses_unknown_names():
    @register_adapter_method("noop-test", dict)
    def inject(model, config):
        return model

    assert get_adapter_method("noop-test").inject is inject
    ADAPTER_METHODS.pop("noop-test")
    with pytest.raises(ConfigError, match="unknown adapter"):
        get_adapter_method("noop-test")
