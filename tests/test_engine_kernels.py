"""The engine and flashmoe_kernels: ``FlashMoE.load`` routes mlx-lm's GatedDeltaNet layers
through the fast recurrence (the kernels' own tests: ``kernels/tests``)."""

from __future__ import annotations

import pytest
from flashmoe_kernels.gated_delta import dispatch as gd


@pytest.fixture
def uninstalled():
    """mlx-lm's own recurrence for the test (FlashMoE.load installs ours process-wide), then
    the installation as it was."""
    was_installed = gd.uninstall_fast_gated_delta()
    yield
    if was_installed:
        gd.install_fast_gated_delta()
    else:
        gd.uninstall_fast_gated_delta()


def test_engine_load_installs_the_fast_recurrence(uninstalled):
    from mlx_lm.models import qwen3_5

    from flashmoe_backend import FlashMoE
    from flashmoe_backend.store.source import default_store

    FlashMoE.load(default_store(), cache_gb=0.01)
    assert qwen3_5.gated_delta_update is gd.gated_delta_update_fast
