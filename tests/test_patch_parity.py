"""Patched Llama vs stock transformers LlamaForCausalLM (the oracle), fp32 and bf16."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, stock_and_patched, stock_model
from torch.testing import assert_close

from modelzoo.config import ModelConfig
from modelzoo.models.llama import PATCH_NAMES, enabled_patches, patch_llama
from modelzoo.models.llama.patch_llama import STRUCTURAL_PATCHES

FP32 = {"atol": 1e-5, "rtol": 0}


def _ids(vocab: int, batch: int = 2, seq: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", FAMILIES)
def test_structural_patches_match_stock_fp32(preset):
    stock, patched = stock_and_patched(preset)
    assert patched.config._attn_implementation == "modelzoo_static"
    ids = _ids(stock.config.vocab_size)
    with torch.no_grad():
        assert_close(patched(ids).logits, stock(ids).logits, **FP32)


@pytest.mark.parametrize("preset", FAMILIES)
def test_padding_mask_goes_through_static_attention(preset):
    """A left-padded batch (2D mask, as generate() passes it) gives stock logits at real tokens."""
    stock, patched = stock_and_patched(preset)
    ids = _ids(stock.config.vocab_size, batch=3, seq=20)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[2, :3] = 0
    with torch.no_grad():
        want = stock(ids, attention_mask=mask).logits
        got = patched(ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close(got[real], want[real], **FP32)


@pytest.mark.parametrize("preset", FAMILIES)
def test_all_patches_on_are_exact_in_fp32(preset):
    """Precision patches only change rounding in low precision; in fp32 they match stock."""
    settings = ModelConfig(fp32_ln=True, fp32_logits=True, fp32_skip_add=True, mixedp_attn=True)
    stock, patched = stock_and_patched(preset, settings)
    assert set(patched._modelzoo_patches) == set(PATCH_NAMES)
    ids = _ids(stock.config.vocab_size)
    with torch.no_grad():
        assert_close(patched(ids).logits, stock(ids).logits, **FP32)


def _max_err(model, ids, reference):
    with torch.no_grad():
        return (model(ids).logits.float() - reference).abs().max().item()


@pytest.mark.parametrize("preset", FAMILIES)
def test_precision_patches_in_bf16(preset):
    """bf16 with the precision patches on stays as close to the fp32 oracle as stock bf16 does.

    Tolerance: bf16 keeps 8 significant bits (unit roundoff u = 2**-8). A logit is the end of a chain
    of ~L*7 rounded ops; with random-sign errors its error grows like sqrt(ops) * u * scale. We bound
    it by 32 * u * max|logit| (a few percent), and require the patched error to be no worse than
    1.5x stock bf16's (the fp32 patches remove roundings, they must not add error).
    """
    settings = ModelConfig(fp32_ln=True, fp32_logits=True, fp32_skip_add=True, mixedp_attn=True)
    reference_model = stock_model(preset)
    ids = _ids(reference_model.config.vocab_size)
    with torch.no_grad():
        reference = reference_model(ids).logits
    stock_bf16 = copy.deepcopy(reference_model).to(torch.bfloat16)
    patched_bf16 = patch_llama(copy.deepcopy(reference_model).to(torch.bfloat16), settings)
    with torch.no_grad():
        assert patched_bf16(ids).logits.dtype == torch.float32  # fp32_logits
    bound = 32 * 2**-8 * reference.abs().max().item()
    err_stock, err_patched = _max_err(stock_bf16, ids, reference), _max_err(patched_bf16, ids, reference)
    assert err_patched <= bound, (err_patched, bound)
    assert err_patched <= 1.5 * err_stock + 1e-6, (err_patched, err_stock)


@pytest.mark.parametrize("name", ["fp32_ln", "fp32_skip_add", "mixedp_attn"])
def test_each_precision_patch_changes_bf16_rounding(name):
    """Each precision patch is live: in bf16 it changes the logits (but only at rounding level)."""
    base = stock_model("llama3_tiny").to(torch.bfloat16)
    ids = _ids(base.config.vocab_size)
    patched = patch_llama(copy.deepcopy(base), ModelConfig(**{name: True}))
    without = patch_llama(copy.deepcopy(base), ModelConfig())
    with torch.no_grad():
        a, b = patched(ids).logits.float(), without(ids).logits.float()
    assert not torch.equal(a, b)
    assert (a - b).abs().max() <= 32 * 2**-8 * b.abs().max()


def _packed_batch(vocab: int, lengths: list[int], seed: int = 3):
    """One packed row: articles of ``lengths`` (each a prompt half + completion + separator)."""
    ids, types = [], []
    gen = torch.Generator().manual_seed(seed)
    for n in lengths:
        ids.append(torch.randint(3, vocab, (n,), generator=gen))
        t = torch.ones(n, dtype=torch.long)
        t[: n // 3] = 0  # prompt
        t[-1] = 3  # closing separator
        types.append(t)
    return ids, types


@pytest.mark.parametrize("preset", FAMILIES)
def test_packed_articles_equal_articles_alone(preset):
    """Two articles packed in one row give the same per-token logits and loss as each alone."""
    _, patched = stock_and_patched(preset)
    arts, types = _packed_batch(patched.config.vocab_size, [13, 21])
    packed_ids, packed_types = torch.cat(arts)[None], torch.cat(types)[None]
    with torch.no_grad():
        packed = patched(packed_ids, token_type_ids=packed_types)
        alone = [patched(a[None], token_type_ids=t[None]) for a, t in zip(arts, types, strict=True)]
    n0 = len(arts[0])
    assert_close(packed.logits[0, :n0], alone[0].logits[0], **FP32)
    assert_close(packed.logits[0, n0:], alone[1].logits[0], **FP32)
    # per-token losses: the target crossing the boundary (index n0-1) has weight 0 and is dropped
    assert packed.loss_weight[0, n0 - 1] == 0
    assert_close(packed.token_loss[0, : n0 - 1], alone[0].token_loss[0], **FP32)
    assert_close(packed.token_loss[0, n0:], alone[1].token_loss[0], **FP32)
    # the packed loss is the weighted mean over both articles' targets
    w = torch.cat([alone[0].loss_weight[0], alone[1].loss_weight[0]])
    tl = torch.cat([alone[0].token_loss[0], alone[1].token_loss[0]])
    assert_close(packed.loss, (w * tl).sum() / w.sum(), **FP32)


def test_article_attention_off_leaks_across_articles():
    """Control for the test above: without article attention the second article sees the first."""
    _, patched = stock_and_patched("llama3_tiny", ModelConfig(article_attention=False))
    arts, types = _packed_batch(patched.config.vocab_size, [13, 21])
    with torch.no_grad():
        packed = patched(torch.cat(arts)[None], token_type_ids=torch.cat(types)[None])
        second = patched(arts[1][None], token_type_ids=types[1][None])
    assert (packed.logits[0, 13:] - second.logits[0]).abs().max() > 1e-3


def test_padding_after_articles_does_not_change_article_logits():
    _, patched = stock_and_patched("llama2_tiny")
    arts, types = _packed_batch(patched.config.vocab_size, [10, 9])
    ids = torch.cat(arts + [torch.zeros(6, dtype=torch.long)])[None]
    tts = torch.cat(types + [torch.full((6,), 2)])[None]
    with torch.no_grad():
        padded = patched(ids, token_type_ids=tts)
        bare = patched(ids[:, :19], token_type_ids=tts[:, :19])
    assert_close(padded.logits[:, :19], bare.logits, **FP32)
    assert padded.loss_weight[0, 18:].sum() == 0
    assert_close(padded.loss, bare.loss, **FP32)


def test_loss_equals_hand_computed_weighted_mean():
    """Prompt/padding/boundary targets get weight 0 (or prompt_loss_weight); loss = weighted mean."""
    plw = 0.25
    _, patched = stock_and_patched("llama2_tiny", {"prompt_loss_weight": plw})
    #               p  p  c  c  s  p  c  s  pad pad
    types = torch.tensor([[0, 0, 1, 1, 3, 0, 1, 3, 2, 2]])
    ids = _ids(patched.config.vocab_size, batch=1, seq=10)
    with torch.no_grad():
        out = patched(ids, token_type_ids=types)
    # expected weight of target t (= token t+1), written out by hand from the contract:
    # t=0 -> p (plw), t=1 -> c, t=2 -> c, t=3 -> s, t=4 -> crosses boundary (0), t=5 -> c,
    # t=6 -> s, t=7 -> pad (and crosses boundary) 0, t=8 -> pad 0
    expected_w = torch.tensor([[plw, 1, 1, 1, 0, 1, 1, 0, 0]])
    assert_close(out.loss_weight, expected_w)
    logp = torch.log_softmax(out.logits[0, :-1].double(), dim=-1)
    ce = -logp[torch.arange(9), ids[0, 1:]]
    expected = (expected_w[0].double() * ce).sum() / expected_w.sum()
    assert_close(out.loss.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("preset", "plw"), [("llama2_tiny", 0.0), ("llama3_2_tiny", 0.25)])
def test_loss_only_path_equals_full_logits(preset, plw):
    """``return_logits=False`` (training) runs the LM head only where a target has weight > 0: the
    same loss, per-token losses and gradients as the full-logits forward (tied head included)."""
    _, full = stock_and_patched(preset, {"prompt_loss_weight": plw})
    lean = copy.deepcopy(full)
    arts, types = _packed_batch(full.config.vocab_size, [13, 21, 9])
    ids = torch.cat(arts + [torch.zeros(5, dtype=torch.long)])[None].repeat(2, 1)
    tts = torch.cat(types + [torch.full((5,), 2)])[None].repeat(2, 1)
    tts[1, :13] = 1  # the second row's first article is all completion
    a = full(ids, token_type_ids=tts)
    b = lean(ids, token_type_ids=tts, return_logits=False)
    assert b.logits is None and a.logits is not None
    assert (a.loss_weight == 0).sum() > 0  # some positions were skipped
    assert_close(b.loss_weight, a.loss_weight, atol=0, rtol=0)
    assert_close(b.token_loss, a.token_loss, **FP32)
    assert_close(b.loss, a.loss, **FP32)
    (a.token_loss * a.loss_weight).sum().backward()
    (b.token_loss * b.loss_weight).sum().backward()
    grads = {n: p.grad for n, p in full.named_parameters()}
    for name, param in lean.named_parameters():
        assert_close(param.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_labels_without_token_types_match_hf_loss():
    stock, patched = stock_and_patched("llama3_tiny")
    ids = _ids(stock.config.vocab_size)
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        assert_close(patched(ids, labels=labels).loss, stock(ids, labels=labels).loss, **FP32)


def test_patching_one_instance_leaves_another_stock():
    stock = stock_model("llama3_tiny")
    twin = copy.deepcopy(stock)
    shares_config = type(stock)(stock.config).eval()  # built from the very same config object
    shares_config.load_state_dict(stock.state_dict())
    ids = _ids(stock.config.vocab_size)
    with torch.no_grad():
        before = twin(ids).logits.clone()
        patch_llama(stock, ModelConfig(fp32_ln=True, fp32_skip_add=True, fp32_logits=True))
        stock(ids)
        after = twin(ids).logits
    assert_close(after, before, atol=0, rtol=0)
    for other in (twin, shares_config):
        assert type(other).__name__ == "LlamaForCausalLM"
        assert other.config._attn_implementation == "sdpa"
        assert type(other.model.norm).__name__ == "LlamaRMSNorm"
        assert type(other.model.layers[0]).__name__ == "LlamaDecoderLayer"


def test_unpatch_restores_stock():
    from modelzoo.models.llama import unpatch_llama

    stock, patched = stock_and_patched("llama2_tiny", ModelConfig(fp32_ln=True, fp32_logits=True))
    unpatch_llama(patched)
    assert type(patched) is type(stock)
    assert patched.config._attn_implementation == "sdpa"
    assert all(type(a) is type(b) for a, b in zip(patched.modules(), stock.modules(), strict=True))


def test_env_var_switches_patches_off(monkeypatch):
    monkeypatch.setenv("MODELZOO_PATCHES", "none")
    assert enabled_patches(ModelConfig(fp32_ln=True)) == ()
    monkeypatch.setenv("MODELZOO_PATCHES", "article_attention,fp32_ln")
    assert enabled_patches(ModelConfig()) == ("article_attention", "fp32_ln")
    monkeypatch.setenv("MODELZOO_PATCHES", "fp32_lm")
    with pytest.raises(ValueError, match="MODELZOO_PATCHES.*fp32_lm"):
        enabled_patches(ModelConfig())


def test_patches_allow_list():
    assert enabled_patches(ModelConfig(patches=[])) == ()
    assert enabled_patches(ModelConfig(patches=["fp32_logits"])) == ("fp32_logits",)
    assert enabled_patches(ModelConfig()) == STRUCTURAL_PATCHES
    with pytest.raises(ValueError, match="unknown patch 'nope'"):
        enabled_patches(ModelConfig(patches=["nope"]))


def test_unsupported_transformers_version_is_refused():
    from modelzoo.models.llama import UnsupportedTransformersError, check_transformers_version

    check_transformers_version("5.24.0")
    with pytest.raises(UnsupportedTransformersError, match=r"4\.46\.0.*pip install 'transformers>=5\.24,<6"):
        check_transformers_version("4.46.0")
