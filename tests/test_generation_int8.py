"""Int8 weight-only generation: logits within the documented tolerance of fp32 (and a small multiple of
the bf16 error), >= 1.8x smaller than bf16, greedy output equal to ``transformers`` on the dequantized
weights, pre-quantized directories load exactly, compiled int8 kernels equal the eager ones.

Documented tolerance (examples/text_generation/README.md): max |int8 logit - fp32 logit| <= 5% of
max |fp32 logit|, at most 4x the error of the same model cast to bf16, and >= 90% argmax agreement.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import FAMILIES, stock_model
from helpers.generation_fixtures import hf_greedy, random_prompts
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from modelzoo.checkpoint.int8 import QUANT_KEY, dequantize_weight, quantizable_linears, quantize_state
from modelzoo.generation import (
    Generator,
    Int8Embedding,
    LlamaDecoder,
    load_for_generation,
    load_prequantized,
    model_nbytes,
    quantize_for_generation_,
)
from modelzoo.generation.kernels import (
    INT8_KERNELS,
    VECTOR_FLAGS,
    _int8_kernel,
    cpu_flags,
    cpu_line,
    dense_linear,
    int8_kernel,
    int8_linear,
    kernel_line,
    note_eager_int8,
)

MAX_REL_ERROR = 0.05
MAX_BF16_MULTIPLE = 4.0


def _ids(vocab, rows=2, length=24):
    return torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(3))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _decoder_last_logits(model, ids):
    dec = LlamaDecoder(model)
    cache = dec.new_cache(ids.shape[0], ids.shape[1])
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    with torch.no_grad():
        return dec(ids, positions, None, cache.k, cache.v, cache.keys(ids.shape[1]))


@pytest.mark.parametrize("preset", FAMILIES)
def test_int8_logits_within_tolerance_and_smaller(preset):
    model = stock_model(preset)
    ids = _ids(model.config.vocab_size)
    ref = _logits(model, ids)
    bf16_err = (_logits(copy.deepcopy(model).to(torch.bfloat16), ids) - ref).abs().max()
    quant = copy.deepcopy(model)
    names = quantize_for_generation_(quant)
    assert isinstance(quant.model.embed_tokens, Int8Embedding) and "model.layers.1.mlp.down_proj" in names
    got = _logits(quant, ids)
    err = (got - ref).abs().max()
    assert err <= MAX_REL_ERROR * ref.abs().max()
    assert err <= MAX_BF16_MULTIPLE * bf16_err
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    # the generation decoder's int8 kernels give the HF forward's int8 logits
    assert_close(_decoder_last_logits(quant, ids), got[:, -1], atol=1e-5, rtol=1e-5)
    bf16_bytes = model_nbytes(copy.deepcopy(model).to(torch.bfloat16))
    assert bf16_bytes / model_nbytes(quant) >= 1.8
    assert model_nbytes(model) / model_nbytes(quant) >= 3.5


def _dequantized_copy(quant, model):
    """A float model holding exactly the weights the int8 model represents."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in quant.named_modules():
            if hasattr(module, "weight_scale"):
                ref.get_submodule(name).weight.copy_(dequantize_weight(module.weight, module.weight_scale))
    return ref


@pytest.fixture
def int8_form(request, monkeypatch):
    """Force a compiled int8 reduction form (``MODELZOO_INT8_KERNEL``); graphs traced with the other
    form are dropped before and after."""
    form = getattr(request, "param", "auto")
    monkeypatch.setenv("MODELZOO_INT8_KERNEL", form)
    _int8_kernel.cache_clear()
    torch._dynamo.reset()
    yield form
    _int8_kernel.cache_clear()
    torch._dynamo.reset()


@pytest.mark.parametrize(("preset", "backend", "int8_form"),
                         [("llama2_tiny", "cpu", "auto"), ("llama3_2_tiny", "cpu", "auto"),
                          ("llama3_2_tiny", "inductor", "int8"), ("llama3_2_tiny", "inductor", "int32x4")],
                         indirect=["int8_form"])
def test_int8_greedy_equals_transformers_on_dequantized_weights(preset, backend, int8_form, caplog):
    """Eager (one-row int8 kernel while a single row decodes, dequantized products for wider steps)
    and compiled (int8 decode reductions in either form, forced here whatever the CPU would choose;
    dequantized GEMMs for prefill) int8 generation equal ``transformers`` on the dequantized weights,
    token for token; eager int8 says once that it is slow."""
    model = stock_model(preset)
    quant = copy.deepcopy(model)
    quantize_for_generation_(quant)
    prompts = random_prompts(model.config.vocab_size)
    want = hf_greedy(_dequantized_copy(quant, model), prompts, 64)
    note_eager_int8.cache_clear()
    with caplog.at_level("WARNING", logger="modelzoo.generation"):
        gen = Generator(quant, backend=backend, batch_size=4, eos_token_ids=[])
        Generator(quant, backend=backend, batch_size=1, eos_token_ids=[])
    notes = [r.getMessage() for r in caplog.records if "int8 weights on the eager cpu backend" in r.getMessage()]
    assert len(notes) == (1 if backend == "cpu" else 0)
    assert [c.token_ids for c in gen.generate_ids(prompts, 64)] == want
    assert [c.token_ids for c in gen.generate_ids(prompts[:1], 64)] == want[:1]  # one row: the int8 kernel


def _write_prequantized(tmp_path, preset, with_embedding):
    """What the conversion tool writes: HF dir, int8 weights + fp32 scales, the config key."""
    model = stock_model(preset)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    names = quantizable_linears(model) + (["model.embed_tokens"] if with_embedding else [])
    save_file(quantize_state(state, names), tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config[QUANT_KEY] = {"method": "int8_weight_only", "scheme": "per_output_channel_absmax", "modules": names}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return model, names


@pytest.mark.parametrize(("preset", "with_embedding"), [("llama2_tiny", False), ("llama3_2_tiny", True)])
def test_prequantized_dir_loads_exactly(tmp_path, preset, with_embedding):
    model, names = _write_prequantized(tmp_path, preset, with_embedding)
    loaded = load_for_generation(str(tmp_path))
    assert getattr(loaded.config, QUANT_KEY)["modules"] == names
    assert not any(p.device.type == "meta" for p in list(loaded.parameters()) + list(loaded.buffers()))
    in_memory = copy.deepcopy(model)
    quantize_for_generation_(in_memory, embeddings=with_embedding)
    ids = _ids(model.config.vocab_size)
    assert torch.equal(_logits(loaded, ids), _logits(in_memory, ids))
    if with_embedding:  # tied model: the LM head reads the int8 embedding table
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert model_nbytes(loaded) < model_nbytes(model) / (3 if with_embedding else 2)  # float embedding stays
    assert loaded.model.layers[0].mlp.up_proj.weight_scale.dtype == torch.float32
    assert load_prequantized(tmp_path, dtype="bfloat16").model.norm.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("int8_form", INT8_KERNELS, indirect=True)
def test_compiled_kernels_equal_eager(int8_form):
    """The reduction-form kernels inductor compiles for decode steps (fp32, and int8 in each form)."""
    assert int8_kernel() == int8_form
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 1, 96, generator=gen), torch.randn(40, 96, generator=gen)
    q, scale = torch.randint(-127, 128, (40, 96), generator=gen, dtype=torch.int8), torch.rand(40) / 100

    def both(x, w, q, s):
        return dense_linear(x, w, None, compiled=True), int8_linear(x, q, s, None, compiled=True)

    dense, int8 = torch.compile(both, dynamic=False)(x, w, q, scale)  # one graph: one compile
    assert_close(dense, x @ w.T, atol=1e-5, rtol=1e-5)
    want = x @ dequantize_weight(q, scale).T
    assert_close(int8, want, atol=1e-5, rtol=1e-5)
    assert_close(int8_linear(x[:1, 0], q, scale, None, compiled=False), want[:1, 0], atol=1e-5, rtol=1e-5)
    assert_close(int8_linear(x, q, scale, None, compiled=False), want, atol=1e-5, rtol=1e-5)  # dequantized


def test_kernel_report_names_the_cpu_and_the_paths():
    """What ``bench_generation.py`` prints: the CPU's vector extensions, the instruction set, the kernels."""
    line = cpu_line()
    assert line.startswith("cpu flags: ") and f"aten: {torch.backends.cpu.get_cpu_capability().lower()}" in line
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    assert set(cpu_flags()) == {f for f in VECTOR_FLAGS if f in flags}
    model = stock_model("llama2_tiny")
    quant = copy.deepcopy(model)
    quantize_for_generation_(quant)
    assert kernel_line(quant, compiled=False).startswith("eager: 1 row torch._weight_int8pack_mm")
    assert f"int8 read as {int8_kernel()}, converted in registers" in kernel_line(quant, compiled=True)
    assert "int8" not in kernel_line(model, compiled=True) and kernel_line(model, compiled=False).startswith("eager")
