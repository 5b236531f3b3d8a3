"""Patches applied to Hugging Face ``transformers.LlamaForCausalLM`` for the compiler backend.

The installed ``transformers`` modeling code is used as is (no vendored copy). Each patch is a
named, documented, switchable unit, and all of them are applied to one model *instance*: the
instance gets its own config copy and its modules get per-instance subclasses, so a stock model in
the same process stays stock, and :func:`unpatch_llama` restores the instance exactly.

Patches (names as used in ``patches=[...]`` and ``MODELZOO_PATCHES``):

``static_attention``
    Attention through ``transformers``' attention-function registry (``attn_implementation =
    "modelzoo_static"``): always an explicit boolean mask of static shape ``[B, 1, S_q, S_kv]``, no
    data-dependent control flow, GQA by ``repeat_interleave``; what a dataflow compiler can lower.
``article_attention``
    With ``token_type_ids`` (or ``article_ids``) given, a packed sequence attends block-diagonally
    causally within each article and positions restart at every article, so a packed row gives the
    same per-token logits as its articles run one by one.
``weighted_loss``
    ``forward(..., token_type_ids=...)`` returns the loss of the contract in ARCHITECTURE.md: per-token
    cross-entropy on ``input_ids`` shifted by one, weighted 1 for completion/separator targets,
    ``prompt_loss_weight`` for prompt targets, 0 for padding and article-crossing targets,
    normalised by the weight sum. Per-token losses and weights are returned too. With
    ``return_logits=False`` (what training uses) the LM head and cross-entropy run only at
    positions whose target has a nonzero weight, and ``logits`` is ``None``.
``fp32_ln``
    RMSNorm computed entirely in fp32 (including the weight multiply), cast back once at the end.
``fp32_logits``
    The LM head runs in fp32 (input and weight upcast), so logits and loss are fp32.
``fp32_skip_add``
    The residual stream is kept in fp32: every skip add happens in fp32; the attention/MLP blocks
    still run in the model dtype.
``mixedp_attn``
    In bf16/fp16 attention, scores are computed in the model dtype and the softmax in fp32, then
    cast back for the value product.

The precision patches change nothing in fp32 models; the structural ones reproduce stock
``LlamaForCausalLM`` logits to fp32 rounding (see ``tests/test_patch_parity.py``).

Set ``MODELZOO_PATCHES=none`` to disable every patch (stock HF behaviour), or a comma-separated
list of names to enable exactly those.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import nn
from transformers import AttentionInterface, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

from modelzoo.config import ModelConfig
from modelzoo.config.schema import PATCH_NAMES, PRECISION_PATCHES, STRUCTURAL_PATCHES
from modelzoo.data.loss import weighted_cross_entropy
from modelzoo.data.token_types import (
    article_causal_mask,
    article_ids_from_token_types,
    loss_weights_from_token_types,
    positions_from_article_ids,
)

#: ``transformers`` versions these patches are tested against (lower inclusive, upper exclusive).
SUPPORTED_TRANSFORMERS = (Version("5.24"), Version("6.0"))  # 5.24 renamed past_key_values to cache

ATTN_IMPLEMENTATION = "modelzoo_static"
ENV_VAR = "MODELZOO_PATCHES"


class UnsupportedTransformersError(RuntimeError):
    """The installed ``transformers`` is outside the range the patches are tested against."""


def patch_settings(settings: ModelConfig | dict | None = None) -> ModelConfig:
    """The patch settings as a :class:`~modelzoo.config.ModelConfig`; a dict gives its fields (and may
    carry ``prompt_loss_weight``), an unknown key raises."""
    if settings is None:
        return ModelConfig()
    if isinstance(settings, ModelConfig):
        return settings
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = [k for k in settings if k not in fields and k != "prompt_loss_weight"]
    if unknown:
        raise TypeError(f"unknown patch setting(s) {', '.join(map(repr, unknown))}; "
                        f"settings are ModelConfig fields: {', '.join(sorted(fields))}")
    return ModelConfig(**{k: v for k, v in settings.items() if k in fields})


def enabled_patches(settings: ModelConfig | dict | None = None) -> tuple[str, ...]:
    """The patch names to apply: ``MODELZOO_PATCHES`` if set, else ``settings.patches`` if given,
    else the structural patches (``article_attention`` per its flag) and the precision patches
    whose flags are on."""
    settings = patch_settings(settings)
    env = os.environ.get(ENV_VAR)
    if env is not None:
        names = [] if env.strip().lower() in ("", "none", "off", "0") else _split(env)
        source = f"environment variable {ENV_VAR}"
    elif settings.patches is not None:
        names, source = list(settings.patches), "patches"
    else:
        return tuple(n for n in PATCH_NAMES
                     if (n in STRUCTURAL_PATCHES and (n != "article_attention" or settings.article_attention))
                     or (n in PRECISION_PATCHES and getattr(settings, n)))
    unknown = [n for n in names if n not in PATCH_NAMES]
    if unknown:
        raise ValueError(
            f"{source}: unknown patch {', '.join(map(repr, unknown))}; valid: {', '.join(PATCH_NAMES)}"
        )
    return tuple(n for n in PATCH_NAMES if n in names)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def check_transformers_version(version: str | None = None) -> None:
    """Raise :class:`UnsupportedTransformersError` outside :data:`SUPPORTED_TRANSFORMERS`."""
    installed = Version(version or transformers.__version__)
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= installed < high:
        raise UnsupportedTransformersError(
            f"transformers {installed} is not supported by modelzoo's Llama patches "
            f"(tested range: >={low},<{high}); install it with: pip install 'transformers>={low},<{high}'"
        )


# ----------------------------------------------------------------------------------------------
# static_attention / mixedp_attn: the attention function registered with transformers
# ----------------------------------------------------------------------------------------------


def static_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with an explicit, static-shape mask.

    Args:
        query: ``[B, H, S_q, D]``; key/value: ``[B, H_kv, S_kv, D]``.
        attention_mask: boolean ``[B or 1, 1, S_q, S_kv]`` (True = attend), an additive float mask
            of that shape, or None for plain causal attention (queries are the last S_q positions).
    Returns:
        ``([B, S_q, H, D], None)`` as ``transformers`` attention functions do.
    """
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if attention_mask is None:
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        attention_mask = attention_mask[None, None]
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if getattr(module, "_modelzoo_mixedp_attn", False) and query.dtype in (torch.bfloat16, torch.float16):
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
        if attention_mask.dtype == torch.bool:
            scores = scores.float().masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores.float() + attention_mask
        probs = torch.softmax(scores, dim=-1).to(query.dtype)
        probs = F.dropout(probs, p=dropout, training=module.training)
        out = torch.matmul(probs, value)
    else:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
        )
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, static_attention_forward)
    # Padding masks from generate() etc. are turned into 4D boolean masks the same way as for sdpa.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


# ----------------------------------------------------------------------------------------------
# precision patches: per-instance subclasses (same parameters, same state_dict keys)
# ----------------------------------------------------------------------------------------------


class Fp32LlamaRMSNorm(LlamaRMSNorm):
    """RMSNorm entirely in fp32 (normalisation and weight multiply), one cast back at the end."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight.float() * x).to(hidden_states.dtype)


class ComputeDtypeLinear(nn.Linear):
    """A Linear that casts its input (and weight) to ``compute_dtype`` first.

    Used for the LM head: fp32 for ``fp32_logits``; the weight dtype when ``fp32_skip_add`` hands it
    an fp32 residual stream.
    """

    compute_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or self.weight.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias)


class Fp32ResidualLlamaDecoderLayer(LlamaDecoderLayer):
    """Decoder layer whose residual stream (input, skip adds, output) is fp32.

    The attention and MLP blocks run in the dtype of their weights.
    """

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                use_cache=False, position_embeddings=None, **kwargs):
        compute_dtype = self.mlp.down_proj.weight.dtype
        if not compute_dtype.is_floating_point:  # int8 weight-only projections compute in the norms' dtype
            compute_dtype = self.input_layernorm.weight.dtype
        residual = hidden_states.float()
        hidden = self.input_layernorm(hidden_states).to(compute_dtype)
        if position_embeddings is not None:
            position_embeddings = tuple(t.to(compute_dtype) for t in position_embeddings)
        hidden, _ = self.self_attn(
            hidden_states=hidden, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=use_cache,
            position_embeddings=position_embeddings, **kwargs,
        )
        residual = residual + hidden.float()
        hidden = self.post_attention_layernorm(residual).to(compute_dtype)
        return residual + self.mlp(hidden).float()


# ----------------------------------------------------------------------------------------------
# the patched model class (per instance) and its output
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelzooCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the per-token loss terms.

    token_loss: ``[B, S-1]`` float32 cross-entropy of each next-token target (0 where weight is 0).
    loss_weight: ``[B, S-1]`` float32 weight of each target.
    """

    token_loss: torch.Tensor | None = None
    loss_weight: torch.Tensor | None = None


class PatchedLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` whose forward also understands packed data from the HDF5 contract.

    Extra keyword arguments (all optional; without them this is the stock forward):
        token_type_ids: ``[B, S]`` token types (0 prompt, 1 completion, 2 padding, 3 separator).
        article_ids: ``[B, S]`` article index per token (derived from token_type_ids if absent).
    """

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                token_type_ids=None, article_ids=None, return_logits=True, **kwargs):
        enabled = self._modelzoo_patches
        if article_ids is None and token_type_ids is not None:
            article_ids = article_ids_from_token_types(token_type_ids)
        if "article_attention" in enabled and article_ids is not None and cache is None:
            if attention_mask is not None and attention_mask.dim() != 4:
                article_mask = article_causal_mask(article_ids)
                padding = attention_mask.to(torch.bool)[:, None, None, :]
                attention_mask = article_mask & padding
            elif attention_mask is None:
                attention_mask = article_causal_mask(article_ids)
            if position_ids is None:
                position_ids = positions_from_article_ids(article_ids)
        weighted = "weighted_loss" in enabled and (token_type_ids is not None or labels is not None)
        if not weighted:
            return super().forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                cache=cache, inputs_embeds=inputs_embeds, labels=labels,
                use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs,
            )
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
        hidden = outputs.last_hidden_state
        if token_type_ids is not None:
            weights = loss_weights_from_token_types(
                token_type_ids, self._modelzoo_prompt_loss_weight, article_ids
            )
            targets = input_ids[:, 1:] if labels is None else labels[:, 1:]
            if labels is not None:
                weights = weights * (targets != -100)
        else:
            targets = labels[:, 1:]
            weights = (targets != -100).to(torch.float32)
        if return_logits or torch.compiler.is_compiling():
            logits = self.lm_head(hidden)
            loss, token_loss = weighted_cross_entropy(logits, targets, weights)
        else:
            logits = None
            loss, token_loss = self._weighted_targets_loss(hidden, targets, weights)
        return ModelzooCausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            token_loss=token_loss, loss_weight=weights,
        )

    def _weighted_targets_loss(self, hidden, targets, weights):
        """The loss with the LM head run only at positions whose target has a nonzero weight (the
        others add exactly 0 to the loss and its gradient). The number of such positions depends
        on the data, so this eager-only path is skipped under ``torch.compile``."""
        keep = weights > 0  # the weight sum is the same over the kept targets
        loss, kept_loss = weighted_cross_entropy(self.lm_head(hidden[:, :-1][keep]), targets[keep], weights[keep])
        token_loss = torch.zeros(weights.shape, dtype=torch.float32, device=weights.device)
        return loss, token_loss.masked_scatter(keep, kept_loss)


# ----------------------------------------------------------------------------------------------
# applying and removing the patches
# ----------------------------------------------------------------------------------------------


def _swap_class(module: nn.Module, new_cls: type, saved: list) -> None:
    saved.append((module, module.__class__))
    module.__class__ = new_cls


def _own_config(model: LlamaForCausalLM) -> None:
    """Give the instance its own config object (submodules share the model's), so changing the
    attention implementation never reaches another model built from the same config."""
    old = model.config
    new = copy.deepcopy(old)
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new


def patch_llama(model: LlamaForCausalLM, settings: ModelConfig | dict | None = None, *,
                prompt_loss_weight: float | None = None) -> LlamaForCausalLM:
    """Patch ``model`` in place (this instance only) and return it.

    Args:
        model: a ``transformers.LlamaForCausalLM`` (stock, not already patched).
        settings: the config's ``model`` section (:class:`~modelzoo.config.ModelConfig`: ``patches``
            and the precision flags), a dict of its fields, or None for the defaults.
        prompt_loss_weight: weight of prompt targets in the ``weighted_loss`` patch (the config's
            ``training.prompt_loss_weight``; a dict may carry it too); default 0.
    """
    check_transformers_version()
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"patch_llama expects a transformers LlamaForCausalLM, got {type(model).__name__}")
    if getattr(model, "_modelzoo_patches", None) is not None:
        raise ValueError("this model is already patched; call unpatch_llama(model) first")
    if prompt_loss_weight is None:
        prompt_loss_weight = float(settings.get("prompt_loss_weight", 0.0)) if isinstance(settings, dict) else 0.0
    settings = patch_settings(settings)
    enabled = enabled_patches(settings)

    saved_classes: list = []
    state = {"classes": saved_classes, "config": model.config}
    _own_config(model)
    if "static_attention" in enabled:
        _register_attention()
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if "mixedp_attn" in enabled:
        for layer in model.model.layers:
            layer.self_attn._modelzoo_mixedp_attn = True
    if "fp32_ln" in enabled:
        for module in model.modules():
            if type(module) is LlamaRMSNorm:
                _swap_class(module, Fp32LlamaRMSNorm, saved_classes)
    if "fp32_skip_add" in enabled:
        for layer in model.model.layers:
            _swap_class(layer, Fp32ResidualLlamaDecoderLayer, saved_classes)
    if "fp32_logits" in enabled or "fp32_skip_add" in enabled:
        _swap_class(model.lm_head, ComputeDtypeLinear, saved_classes)
        model.lm_head.compute_dtype = torch.float32 if "fp32_logits" in enabled else None
    _swap_class(model, PatchedLlamaForCausalLM, saved_classes)
    model._modelzoo_patches = enabled
    model._modelzoo_settings = settings
    model._modelzoo_prompt_loss_weight = prompt_loss_weight
    model._modelzoo_state = state
    return model


def unpatch_llama(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Undo :func:`patch_llama` on this instance: original classes, config and attention."""
    state = getattr(model, "_modelzoo_state", None)
    if state is None:
        raise ValueError("this model is not patched by modelzoo")
    for module, cls in reversed(state["classes"]):
        module.__class__ = cls
    own_config = model.config
    for module in model.modules():
        if getattr(module, "config", None) is own_config:
            module.config = state["config"]
        if getattr(module, "_modelzoo_mixedp_attn", False):
            del module._modelzoo_mixedp_attn
    if isinstance(model.lm_head, nn.Linear) and "compute_dtype" in model.lm_head.__dict__:
        del model.lm_head.compute_dtype
    for attr in ("_modelzoo_patches", "_modelzoo_settings", "_modelzoo_prompt_loss_weight", "_modelzoo_state"):
        delattr(model, attr)
    return model


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "_modelzoo_patches", None) is not None
