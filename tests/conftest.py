import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter. Must be set before triton
# decorates any kernel, i.e. before ssn_kernels.fused_act is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Decorate the kernels now, under the interpreter: a test that later sets TRITON_INTERPRET=0
    # (to check the error for a forced triton backend) must not be the first to import them.
    import ssn_kernels.fused_act  # noqa: F401, E402
os.environ.pop("SSN_BACKEND", None)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """{"llama": path, "gpt2": path}: tiny checkpoint folders with a chat-template tokenizer."""
    from tiny_ckpt import make_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    return {arch: make_checkpoint(root / arch, arch) for arch in ("llama", "gpt2")}


@pytest.fixture(scope="session")
def long_ckpt(tmp_path_factory):
    """A tiny llama checkpoint with an 8192-token context, for tests that need a row still
    decoding after a timeout, grace period or disconnect: the 512-token one writes its whole
    context in under half a second on a fast machine (about 1 ms a step), so a row of 4000
    tokens takes seconds there and the timed event always lands mid-row."""
    from tiny_ckpt import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("long") / "llama", "llama", max_position_embeddings=8192)


@pytest.fixture(scope="session")
def prompts_jsonl(tmp_path_factory):
    from tiny_ckpt import write_prompts

    return write_prompts(tmp_path_factory.mktemp("data") / "prompts.jsonl")
