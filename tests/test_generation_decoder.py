"""The generation decoder honours the precision patches: in bfloat16 with ``fp32_ln`` and ``fp32_logits``,
its logits (prefill and every decode step) are those of the patched model's full forward, and its
greedy tokens are the ones that forward picks.

``test_generation_parity`` covers the decoder with the precision patches off (against
``transformers``' ``generate``); here the oracle is the patched model itself, run without any cache
on each row's unpadded sequence (prompt + the tokens generated so far).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, stock_model
from helpers.generation_fixtures import random_prompts

from modelzoo.generation import Generator
from modelzoo.models.llama import patch_llama

PRECISION = {"fp32_ln": True, "fp32_logits": True}
NEW_TOKENS = 6
# Different lengths, so the batch is left-padded (the decoder's mask and positions are exercised).
PROMPT_LENGTHS = (5, 9, 3, 7)

# Elementwise bound, relative to the largest |logit| of the step: 2**-7 of it is one to two bf16 ulps
# at that magnitude (bf16 keeps 8 significant bits). The decoder runs the same bf16 operations as the
# full forward, but over the cache (attention over a masked, left-padded slot range; one-row linears
# in decode), so fp32 partial sums are added in another order and a bf16 rounding of some
# intermediate can flip: one ulp, which reaches the logits as about one ulp (measured on a 2-core x86
# CPU: bit-identical at these lengths; up to 1.3 ulps on some steps once the cache passes 16 slots).
MAX_ULPS_REL = 2.0**-7
# The fp32_ln patch itself changes a bf16 norm output by at most one ulp too (one rounding instead of
# two), so no elementwise bound that admits the rounding flips above can tell "fp32_ln honoured"
# from "fp32_ln ignored". The mean over every logit of every step can: order-dependent flips touch
# a few steps, while ignoring fp32_ln perturbs every norm output of every step. So the decoder's mean
# distance to the fp32_ln forward must be well below the mean distance between the forwards with
# fp32_ln on and off (measured ratio: about 7 with the rounding flips of 16+ slots, infinite here; a
# decoder that ignores fp32_ln, e.g. by calling the stock RMSNorm forward, gives 1).
MEAN_FRACTION = 1 / 3


def _decode(model, prompts):
    """Greedy generation with the decoder; returns the completions and the logits ``[B, V]`` of every
    decoder call (prefill first, then one per decode step)."""
    gen = Generator(model, batch_size=len(prompts), eos_token_ids=[])
    calls: list[torch.Tensor] = []
    step = gen.step

    def recording(*args):
        logits = step(*args)
        calls.append(logits.clone())
        return logits

    gen.step = recording
    completions = gen.generate_ids(prompts, NEW_TOKENS)
    # one prefill call per prompt (its own row, [1, V]), then decode steps over all rows ([B, V])
    prefill = torch.cat(calls[:len(prompts)])
    return completions, [prefill] + calls[len(prompts):]


@pytest.mark.parametrize("preset", FAMILIES)
def test_bf16_decoder_matches_patched_forward_with_fp32_ln_and_logits(preset):
    stock = stock_model(preset).to(torch.bfloat16)
    reference = patch_llama(copy.deepcopy(stock), dict(PRECISION))
    without_ln = patch_llama(copy.deepcopy(stock), {**PRECISION, "fp32_ln": False})
    served = patch_llama(copy.deepcopy(stock), dict(PRECISION))
    prompts = random_prompts(stock.config.vocab_size, lengths=PROMPT_LENGTHS)

    completions, calls = _decode(served, prompts)
    assert len(calls) == NEW_TOKENS  # one prefill, then a decode step per further token
    assert all(len(c.token_ids) == NEW_TOKENS for c in completions)

    # Each row's whole sequence in one full forward: causal, so position len(prompt) - 1 + t holds the
    # logits of the prefix the decoder's call t saw.
    distance, ln_effect = 0.0, 0.0
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            ids = torch.tensor([prompt + completions[row].token_ids])
            want_all = reference(ids).logits[0, len(prompt) - 1:]
            off_all = without_ln(ids).logits[0, len(prompt) - 1:]
            assert want_all.dtype == torch.float32
            for t, logits in enumerate(calls):
                assert logits.dtype == torch.float32, "fp32_logits: the decoder's logits must be float32"
                got, want = logits[row], want_all[t]
                bound = MAX_ULPS_REL * want.abs().max().item()
                err = (got - want).abs().max().item()
                assert err <= bound, f"row {row}, call {t}: max |logit diff| {err:.2e} > {bound:.2e}"
                # greedy: the decoder's token at this step is the full forward's argmax on the same prefix
                assert completions[row].token_ids[t] == int(want.argmax()), f"row {row}, token {t}"
                distance += (got - want).abs().mean().item()
                ln_effect += (off_all[t] - want).abs().mean().item()
    assert ln_effect > 0  # fp32_ln changes something in bf16, else the check below proves nothing
    assert distance <= MEAN_FRACTION * ln_effect, (
        f"decoder's mean logit distance to the fp32_ln forward ({distance:.3e}) is not well below the "
        f"fp32_ln on/off difference ({ln_effect:.3e}): the decoder does not compute RMSNorm in fp32"
    )
