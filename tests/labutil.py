"""Guard for tests that need root, iproute2 and nftables: skip with the reason."""

from __future__ import annotations

import pytest

from natlab.netns import missing_requirements

REASON = missing_requirements()
lab = [pytest.mark.lab, pytest.mark.skipif(REASON is not None, reason=f"lab test: {REASON}")]
