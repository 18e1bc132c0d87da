"""A scoring pass: how much the last tokens of a text attend to each of its tokens.

The score of token ``t`` is the attention probability that the last ``window`` queries of the text put on it,
summed over those queries and every query head and averaged over the layers, then smoothed over neighbouring tokens
(SnapKV's observation window, Li et al. 2024, taken across all heads: a kvcondense layout keeps or frees a token in
every layer at once). It is computed by the model itself on the raw text with full causal attention: the text before
the window is read in chunks through a cache (a chunked prefill's memory), then the window runs through a registered
attention implementation that adds the scores beside the ordinary sdpa/eager output.

A method whose layout reads scores (the sentinel ``scored`` placement: keep the highest-scoring tokens raw, condense
the rest into ``<CR>``s) says so with :meth:`kvcondense.methods.base.Method.scoring`; :func:`method_layout`
is the one place that runs the pass before asking such a method for a layout.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .errors import UsageError
from .forward import attention_implementation, attn_implementation
from .layout import Kind, Layout
from .lora import lora_gate
from .merge import eager_of
from .methods.base import Method, TokenizedText

SCORING = {"sdpa": "kvcondense_score", "eager": "kvcondense_score_eager"}
"""The registered attention implementations of the scoring pass (see :func:`_scoring_attention`), by the attention
they compute the output with; each is registered with that attention's mask function (a name transformers' mask
registry does not know gets no causal mask at all, which is wrong for a window read over a cache)."""
POOL = 5
QUERY_BLOCK = 256
"""Scoring queries handled at once (their probabilities over every key are held in fp32: 256 x T per head)."""
"""Width of the window over which a token's score is averaged with its neighbours' (SnapKV's kernel)."""


def _scoring_attention(
    module, query, key, value, attention_mask, kvc_window=1, kvc_scores=None, kvc_base="sdpa", kvc_reduce="sum",
    kvc_norms=None, **kw
):  # fmt: skip
    """The model's own attention, plus the attention probabilities of the last ``kvc_window`` queries (causal)
    summed (``kvc_reduce="max"``: their maximum) over those queries and over each KV head's group of query heads,
    appended to ``kvc_scores`` as (B, KV heads, T); with a ``kvc_norms`` list, the values' norms (B, KV heads, T)
    are appended to it."""
    base = eager_of(module) if kvc_base == "eager" else ALL_ATTENTION_FUNCTIONS[kvc_base]
    out = base(module, query, key, value, attention_mask, **kw)
    k = repeat_kv(key, query.shape[1] // key.shape[1]).float()  # (B, H, T, d)
    b, h, t, _ = k.shape
    scale = module.scaling if kw.get("scaling") is None else kw["scaling"]
    reduce = (lambda x, dim: x.amax(dim)) if kvc_reduce == "max" else (lambda x, dim: x.sum(dim))
    combine = torch.maximum if kvc_reduce == "max" else torch.add
    total = None
    for lo in range(t - min(kvc_window, query.shape[2]), t, QUERY_BLOCK):  # query rows in blocks: bounded memory
        q = query[:, :, lo - t + query.shape[2] : min(lo + QUERY_BLOCK, t) - t + query.shape[2]].float()
        future = torch.arange(t, device=q.device)[None, :] > torch.arange(lo, lo + q.shape[2], device=q.device)[:, None]
        probs = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(future, float("-inf")), dim=-1)
        part = reduce(reduce(probs, 2).view(b, key.shape[1], h // key.shape[1], t), 2)  # over queries, then group
        total = part if total is None else combine(total, part)
    if kvc_norms is not None:
        kvc_norms.append(value.float().norm(dim=-1))
    kvc_scores.append(total)
    return out


for _name, _mask in ((SCORING["sdpa"], sdpa_mask), (SCORING["eager"], eager_mask)):
    AttentionInterface.register(_name, _scoring_attention)
    AttentionMaskInterface.register(_name, _mask)


@torch.no_grad()
def token_scores(model, ids: torch.Tensor, window: int, chunk_tokens: int = 512) -> torch.Tensor:
    """Scores (T,) of the tokens ``ids`` (T,): see the module docstring. The model runs the raw text as plain
    text (a conditional LoRA stays off, as on any text token); ``window`` is clipped to the text. The text before
    the window is fed in chunks of ``chunk_tokens`` through a cache (memory bounded as in a chunked prefill), then
    the window, whose attention is the score."""
    return pool_scores(head_scores(model, ids, window, chunk_tokens).sum(1).mean(0))


def pool_scores(scores: torch.Tensor, width: int = POOL) -> torch.Tensor:
    """Each score (..., T) averaged with its neighbours' over ``width`` tokens (fewer at the ends; odd widths)."""
    if width <= 1:
        return scores.clone()
    flat = scores.reshape(-1, 1, scores.shape[-1])
    pooled = F.avg_pool1d(flat, width, stride=1, padding=width // 2, count_include_pad=False)
    return pooled.reshape(scores.shape)


@torch.no_grad()
def head_scores(
    model, ids: torch.Tensor, window: int, chunk_tokens: int = 512, reduce: str = "sum", value_norm: bool = False
) -> torch.Tensor:
    """Scores before pooling, per layer and KV head: (layers, KV heads, T), the attention probability the last
    ``window`` queries put on each token, summed over them and over the query heads that share the KV head
    (``reduce="max"``: the largest; ``value_norm``: times the norm of the token's value, as ExpectedAttention).
    The pass runs in eval mode (no dropout; gradient checkpointing would drop the cache), every module's mode
    restored afterwards."""
    inner = getattr(model, "module", model)
    check_full_attention(inner.config, ids.shape[0])
    modes = [(m, m.training) for m in inner.modules()]
    inner.eval()
    try:
        scores = _scores_by_layer(inner, ids, window, chunk_tokens, reduce, value_norm)
    finally:
        for module, mode in modes:
            module.training = mode
    return scores


def check_full_attention(config, n: int) -> None:
    """Refuse, in one line, a text longer than a sliding window of the model: its layers do not see every token, so
    a score of every token by every layer does not exist (and the scoring attention applies no window)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    sliding = any("sliding" in t for t in types) if types else bool(getattr(cfg, "use_sliding_window", True))
    if window and sliding and n > window:
        raise UsageError(
            f"the scoring pass needs full attention over the text: this model's layers see a sliding window of "
            f"{window} tokens and the text has {n}; use a placement without scores"
        )


def _scores_by_layer(inner, ids, window: int, chunk_tokens: int, reduce: str, value_norm: bool) -> torch.Tensor:
    window = max(1, min(int(window), ids.shape[0]))
    scores: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []  # the values' norms, if asked
    base = attn_implementation(inner)
    score_base = "eager" if base == "eager" else "sdpa"  # flash/flex kernels cannot take the mask the scores need
    cache = DynamicCache(config=inner.config)
    bounds = [*range(0, ids.shape[0] - window, chunk_tokens), ids.shape[0] - window, ids.shape[0]]
    bounds = sorted(set(bounds))
    extra = {"kvc_window": window, "kvc_scores": scores, "kvc_base": score_base, "kvc_reduce": reduce,
             "kvc_norms": norms if value_norm else None}  # fmt: skip
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        last = hi == ids.shape[0]
        kinds = torch.full((1, hi - lo), int(Kind.TEXT), dtype=torch.long)
        with lora_gate(inner, kinds), attention_implementation(inner, SCORING[score_base] if last else base):
            inner(
                input_ids=ids[None, lo:hi].to(inner.device),
                position_ids=torch.arange(lo, hi, device=inner.device)[None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **(extra if last else {}),
            )
    if not scores:
        raise RuntimeError(f"the scoring pass saw no attention call: {type(inner).__name__} drops attention kwargs")
    if any(s.shape[-1] != ids.shape[0] for s in scores):  # a cache that kept fewer keys than the text
        raise UsageError(f"the scoring pass saw fewer than the text's {ids.shape[0]} keys in some layer: it needs "
                         "full attention in every layer")  # fmt: skip
    out = torch.stack(scores)[:, 0].float().cpu()
    return out * torch.stack(norms)[:, 0].cpu() if value_norm else out  # ExpectedAttention's weighting by ||v||


@torch.no_grad()
def repeat_scores(model, ids: torch.Tensor, instruction: torch.Tensor, chunk_tokens: int = 512) -> torch.Tensor:
    """KVzip's score (Kim et al. 2025), per layer and KV head: the model reads ``ids`` (T,), then ``instruction``
    (a request to repeat it) and ``ids`` again; a token's score is the largest attention any query of that replay
    (and of any query head of the group) puts on it. Returns (layers, KV heads, T)."""
    replay = torch.cat([ids, instruction, ids])
    return head_scores(model, replay, replay.shape[0] - ids.shape[0], chunk_tokens, reduce="max")[..., : ids.shape[0]]


def with_scores(model, method: Method, text: TokenizedText) -> TokenizedText:
    """``text`` with the scores its method's layout reads (unchanged if it reads none or has them already)."""
    spec = method.scoring()
    if spec is None or (text.scores is not None and (text.head_scores is not None or not spec.per_head)):
        return text
    heads = None
    if spec.replay < 1:
        heads = head_scores(model, text.ids, spec.window, value_norm=spec.value_norm)
        if spec.mean:
            heads = heads / seen_by(text.ids.shape[0], spec.window)
    if spec.replay > 0:  # KVzip without its request to repeat (the method has no tokenizer): the text, then its copy
        replayed = repeat_scores(model, text.ids, text.ids[:0])
        if heads is None:
            heads = replayed
        else:
            heads = (1 - spec.replay) * share(heads) + spec.replay * share(replayed)
    return dataclasses.replace(
        text,
        scores=pool_scores(heads.sum(1).mean(0), spec.pool),
        head_scores=pool_scores(heads, spec.pool) if spec.per_head else None,
    )


def share(scores: torch.Tensor) -> torch.Tensor:
    """Each head's scores (..., T) as shares of their sum over the text."""
    return scores / scores.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def seen_by(n: int, window: int) -> torch.Tensor:
    """How many of the last ``window`` queries of ``n`` tokens see each token (causal). (n,) float."""
    return (n - torch.clamp(torch.arange(n), min=n - min(window, n))).float()


def method_layout(model, method: Method, text: TokenizedText, token_ids: dict[str, int], seed: int = 0) -> Layout:
    """The layout of ``text`` under ``method``, after the scoring pass if the method reads scores."""
    return method.layout(with_scores(model, method, text), token_ids, seed=seed)
