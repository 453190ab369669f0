import os

# Triton decides at import time whether its own library functions (tl.zeros, ...) run in the interpreter, so the
# variable must be set before anything imports triton (peft and transformers may): here, before any test module.
# The Triton kernels then run on CPU tensors; `auto` never picks triton for CPU tensors, so other tests are unaffected.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
