"""A scoring pass: how much the last tokens of a text attend to each of its tokens.

The score of token ``t`` is the attention probability that the last ``window`` queries of the text put on it,
summed over those queries and every query head and averaged over the layers, then smoothed over neighbouring tokens
(SnapKV's observation window, Li et al. 2024, taken across all heads: a kvcondense layout keeps or frees a token in
every layer at once). It is computed by the model itself on the raw text with full causal attention, read in chunks
through a cache (a chunked prefill's memory); the chunks holding scoring queries run through a registered attention
implementation that adds their scores beside the ordinary sdpa/eager output. One read can collect several
:class:`Part` s (``scored-heads``: the text's own attention and KVzip's replay score from one read of the text and
its copy).

A method whose layout reads scores (the sentinel ``scored`` placement: keep the highest-scoring tokens raw, condense
the rest into ``<CR>``s) says so with :meth:`kvcondense.methods.base.Method.scoring`; :func:`method_layout`
is the one place that runs the pass before asking such a method for a layout.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .errors import UsageError
from .forward import attention_implementation, attn_implementation
from .layout import Kind, Layout
from .lora import lora_gate
from .methods.base import Method, TokenizedText
from .models import attention_window
from .score_tally import SCORING, Part, Tally

POOL = 5
"""Width of the window over which a token's score is averaged with its neighbours' (SnapKV's kernel)."""
READ_CHUNK = 512
"""Tokens the scoring pass reads at once (through its cache, as a chunked prefill)."""


@dataclasses.dataclass
class PromptRead:
    """What the scoring pass computed for the first ``n`` tokens of its read (the prompt, plain causal attention:
    what a prefill of it computes): each layer's keys and values (1, KV heads, n, d), and the logits (V,) of token
    ``n - 1``. A prefill takes them instead of reading the prompt again (:func:`prompt_layout`)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor


@torch.no_grad()
def token_scores(model, ids: torch.Tensor, window: int, chunk_tokens: int = READ_CHUNK) -> torch.Tensor:
    """Scores (T,) of the tokens ``ids`` (T,): see the module docstring. The model runs the raw text as plain
    text (a conditional LoRA stays off, as on any text token); ``window`` is clipped to the text. The text is fed in
    chunks of ``chunk_tokens`` through a cache (memory bounded as in a chunked prefill)."""
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
    model, ids: torch.Tensor, window: int, chunk_tokens: int = READ_CHUNK, reduce: str = "sum", value_norm: bool = False
) -> torch.Tensor:
    """Scores before pooling, per layer and KV head: (layers, KV heads, T), the attention probability the last
    ``window`` queries put on each token, summed over them and over the query heads that share the KV head
    (``reduce="max"``: the largest; ``value_norm``: times the norm of the token's value, as ExpectedAttention)."""
    n = ids.shape[0]
    (scores,), norms = scoring_pass(model, ids, (Part(n - max(1, min(int(window), n)), n, reduce),), chunk_tokens,
                                    value_norm)  # fmt: skip
    return scores if norms is None else scores * norms


@torch.no_grad()
def scoring_pass(
    model, ids: torch.Tensor, parts: tuple[Part, ...], chunk_tokens: int = READ_CHUNK, value_norm: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """One read of ``ids`` (N,) by the model with full causal attention, in chunks of ``chunk_tokens`` through a
    cache, collecting each part's reduced attention: a list of (layers, KV heads, N), and the values' norms
    (layers, KV heads, N) if ``value_norm``. The pass runs in eval mode (no dropout; gradient checkpointing would
    drop the cache), every module's mode restored afterwards."""
    scores, norms, _ = _pass(model, ids, parts, chunk_tokens, value_norm)
    return scores, norms


@torch.no_grad()
def _pass(model, ids, parts, chunk_tokens: int, value_norm: bool, keep: int = 0):
    """:func:`scoring_pass`, and with ``keep`` > 0 the :class:`PromptRead` of the first ``keep`` tokens."""
    inner = getattr(model, "module", model)
    check_full_attention(inner.config, ids.shape[0])
    modes = [(m, m.training) for m in inner.modules()]
    inner.eval()
    try:
        return _read(inner, ids, Tally(tuple(parts), value_norm), chunk_tokens, keep)
    finally:
        for module, mode in modes:
            module.training = mode


def check_full_attention(config, n: int) -> None:
    """Refuse, in one line, a text longer than a sliding window of the model: its layers do not see every token, so
    a score of every token by every layer does not exist (and the scoring attention applies no window)."""
    window = attention_window(config)
    if window is not None and n > window:
        raise UsageError(
            f"the scoring pass needs full attention over the text: this model's layers see a sliding window of "
            f"{window} tokens and the text has {n}; use a placement without scores"
        )


def _read(inner, ids, tally: Tally, chunk_tokens: int, keep: int = 0):
    if chunk_tokens < 1:
        raise UsageError(f"the scoring pass reads at least one token at a time, got chunk_tokens={chunk_tokens}")
    n = ids.shape[0]
    base = attn_implementation(inner)
    score_base = "eager" if base == "eager" else "sdpa"  # flash/flex kernels cannot take the mask the scores need
    # every key kept, whatever the config says (a sliding layer's cache drops keys; check_full_attention has made
    # sure that every layer sees the whole text): the read's keys and values are then the prompt's, all of them
    cache = DynamicCache()
    extra = {"kvc_tally": tally, "kvc_base": score_base}
    bounds = sorted({*range(0, n, chunk_tokens), *([keep] if 0 < keep < n else []), n})
    logits = None
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        scoring = hi == n or any(p.lo < hi and p.hi > lo for p in tally.parts)  # the last: every key's norm
        kinds = torch.full((1, hi - lo), int(Kind.TEXT), dtype=torch.long)
        with lora_gate(inner, kinds), attention_implementation(inner, SCORING[score_base] if scoring else base):
            out = inner(
                input_ids=ids[None, lo:hi].to(inner.device),
                position_ids=torch.arange(lo, hi, device=inner.device)[None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **(extra if scoring else {}),
            )
        if hi == keep:
            logits = out.logits[0, -1]
    if not tally.scores or any(None in row for row in tally.scores.values()):
        raise RuntimeError(f"the scoring pass saw no attention call: {type(inner).__name__} drops attention kwargs")
    if any(t != n for t in tally.keys.values()):  # a cache that kept fewer keys than the text
        raise UsageError(f"the scoring pass saw fewer than the text's {n} keys in some layer: it needs "
                         "full attention in every layer")  # fmt: skip
    layers = sorted(tally.scores)
    scores = [torch.stack([F.pad(tally.scores[i][j], (0, n - tally.scores[i][j].shape[-1])) for i in layers])[:, 0]
              .float().cpu() for j in range(len(tally.parts))]  # fmt: skip
    norms = torch.stack([tally.norms[i] for i in layers])[:, 0].float().cpu() if tally.value_norm else None
    read = None
    if keep:
        read = PromptRead([(lay.keys[:, :, :keep], lay.values[:, :, :keep]) for lay in cache.layers], logits)
    return scores, norms, read


@torch.no_grad()
def repeat_scores(model, ids: torch.Tensor, instruction: torch.Tensor, chunk_tokens: int = READ_CHUNK) -> torch.Tensor:
    """KVzip's score (Kim et al. 2025), per layer and KV head: the model reads ``ids`` (T,), then ``instruction``
    (a request to repeat it) and ``ids`` again; a token's score is the largest attention any query of the request
    or the replay (and of any query head of the group) puts on it. Returns (layers, KV heads, T)."""
    replay = torch.cat([ids, instruction, ids])
    n, t = replay.shape[0], ids.shape[0]
    (scores,), _ = scoring_pass(model, replay, (Part(t, n, "max", keys=t),), chunk_tokens)  # the request's too
    return scores[..., :t]


def with_scores(model, method: Method, text: TokenizedText) -> TokenizedText:
    """``text`` with the scores its method's layout reads (unchanged if it reads none or has them already)."""
    return _with_scores(model, method, text)[0]


def _with_scores(model, method: Method, text: TokenizedText, keep: bool = False):
    """(:func:`with_scores`, and with ``keep`` the :class:`PromptRead` of the text, or None without a pass)."""
    spec = method.scoring()
    if spec is None or (text.scores is not None and (text.head_scores is not None or not spec.per_head)):
        return text, None
    n = text.ids.shape[0]
    parts = []  # one read: the attention score from the text's own queries, the replay's from its copy
    if spec.replay < 1:
        parts.append(Part(n - max(1, min(spec.window, n)), n, "sum"))
    if spec.replay > 0:  # KVzip without its request to repeat (the method has no tokenizer): the text, then its copy
        parts.append(Part(n, 2 * n, "max", keys=n))
    ids = text.ids if spec.replay == 0 else torch.cat([text.ids, text.ids])
    value_norm = spec.value_norm and spec.replay < 1
    got, norms, read = _pass(model, ids, tuple(parts), READ_CHUNK, value_norm, n if keep else 0)
    heads = None
    if spec.replay < 1:
        heads = got[0][..., :n] if norms is None else got[0][..., :n] * norms[..., :n]
        if spec.mean:
            heads = heads / seen_by(n, spec.window)
    if spec.replay > 0:
        replayed = got[-1][..., :n]
        heads = replayed if heads is None else (1 - spec.replay) * share(heads) + spec.replay * share(replayed)
    scored = dataclasses.replace(
        text,
        scores=pool_scores(heads.sum(1).mean(0), spec.pool),
        head_scores=pool_scores(heads, spec.pool) if spec.per_head else None,
    )
    return scored, read


def share(scores: torch.Tensor) -> torch.Tensor:
    """Each head's scores (..., T) as shares of their sum over the text."""
    return scores / scores.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def seen_by(n: int, window: int) -> torch.Tensor:
    """How many of the last ``window`` queries of ``n`` tokens see each token (causal). (n,) float."""
    return (n - torch.clamp(torch.arange(n), min=n - min(window, n))).float()


def method_layout(model, method: Method, text: TokenizedText, token_ids: dict[str, int], seed: int = 0) -> Layout:
    """The layout of ``text`` under ``method``, after the scoring pass if the method reads scores."""
    return method.layout(with_scores(model, method, text), token_ids, seed=seed)


def prompt_layout(
    model, method: Method, text: TokenizedText, token_ids: dict[str, int], seed: int = 0
) -> tuple[Layout, PromptRead | None]:
    """:func:`method_layout`, and the scoring pass's :class:`PromptRead` of the text when the layout is that text
    read whole before anything is freed (plain tokens and positions, every key seen by every prompt token: the
    ``scored`` methods), so that a prefill need not read it again; None otherwise."""
    scored, read = _with_scores(model, method, text, keep=True)
    layout = method.layout(scored, token_ids, seed=seed)
    n = len(text)
    plain = (
        read is not None
        and len(layout) == n
        and torch.equal(layout.input_ids, text.ids)
        and bool((layout.kinds == int(Kind.TEXT)).all())
        and torch.equal(layout.position_ids, torch.arange(n))
        and bool((layout.expire >= n - 1).all())
        and bool((layout.start == 0).all())
        and not bool(layout.closer_only.any())
        and layout.mix_online is None
        and (layout.head_expire is None or bool((layout.head_expire >= n - 1).all()))
    )
    return layout, read if plain else None
