"""A registry holding only this pack's plugins, so the tests do not depend on what else is installed."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from vitdecomp import Registry  # noqa: E402

from vitdecomp_transformers import clip, dinov2, loading, vit  # noqa: E402


@pytest.fixture(scope="session")
def registry():
    return Registry.from_plugins([vit, dinov2, clip, loading])
