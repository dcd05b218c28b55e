import pytest

import tokencarve_kernels as tk


@pytest.fixture
def triton_backend():
    """The Triton kernels behind the score ops for the test (TOKENCARVE_BACKEND=triton)."""
    pytest.importorskip("triton", reason="the triton backend needs the triton package")
    with tk.use_backend("triton"):
        yield
