"""Online-memory evaluation (CCM's tables): answer quality against the number of compressed chunks t.

Every episode is cut to its last t chunks (t = 1, 2, 4, 8, 16 by default; the same episodes at every t, those
with at least max(t) chunks). Dialogue answers are scored by perplexity of the last turn; tasks with options by
accuracy (each option scored by its log-likelihood after the memory and the query). Every row carries the KV the
memory holds when the query starts, in slots and in MiB measured on the evicting cache.

    kvcondense eval --checkpoint checkpoints/merge-chitchat --data chitchat --baselines
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .cache import EvictingCache
from .engine import incremental_forward
from .errors import UsageError
from .forward import num_layers, parallel_forward
from .layout import IGNORE, Layout, text_layout
from .methods import EpisodeTokens, Method, build_method, tokenize_episode
from .verify import max_abs_diff

STEPS = (1, 2, 4, 8, 16)


@dataclass
class Scored:
    """What one method did on the episodes at one t."""

    nll: float = 0.0
    tokens: int = 0
    correct: int = 0
    episodes: int = 0
    slots: int = 0


def memory_slots(lay: Layout, tail: int) -> int:
    """KV slots held when the query starts (everything but the ``tail`` query + answer tokens)."""
    return lay.kept_slots(upto=len(lay) - tail - 1) if len(lay) > tail else 0


def _nll(model, layouts: list[Layout]) -> list[tuple[float, int]]:
    """Summed answer NLL and answer length of each layout, in one parallel forward."""
    logits = parallel_forward(model, layouts).logits.float()
    out = []
    for b, lay in enumerate(layouts):
        scored = lay.targets != IGNORE
        nll = F.cross_entropy(logits[b, : len(lay)][scored], lay.targets[scored].to(logits.device), reduction="sum")
        out.append((float(nll), int(scored.sum())))
    return out


@torch.no_grad()
def score_episodes(model, method: Method, token_ids: dict, episodes: list[EpisodeTokens], batch_size: int) -> Scored:
    """Perplexity (episodes without options) or accuracy (with options) of ``method`` on ``episodes``."""
    s = Scored()
    for lo in range(0, len(episodes), batch_size):
        batch = episodes[lo : lo + batch_size]
        layouts = [method.episode_layout(ep, token_ids) for ep in batch]
        s.slots += sum(
            memory_slots(lay, len(ep.query) + len(ep.answer)) for lay, ep in zip(layouts, batch, strict=True)
        )
        s.episodes += len(batch)
        if not batch[0].options:
            for nll, n in _nll(model, layouts):
                s.nll, s.tokens = s.nll + nll, s.tokens + n
            continue
        for ep in batch:
            scores = _nll(model, [method.episode_layout(ep.with_answer(opt), token_ids) for opt in ep.options])
            best = min(range(len(scores)), key=lambda i: scores[i][0])
            s.correct += int(torch.equal(ep.options[best], ep.answer))
    return s


def bytes_per_slot(model) -> int:
    """KV bytes per stored slot, measured: one token through an evicting cache."""
    cache = EvictingCache(num_layers(model))
    incremental_forward(model, text_layout(torch.tensor([0])), chunk_size=1, cache=cache)
    return cache.kv_bytes() // max(1, cache.physical_length)


OTHER_MEMORY = "other-memory"
"""The control baseline: the method with the memory of another episode (the next one, cyclically). What a memory
gains over it is what it kept of its own episode; what is left is what the trained memory tokens do whatever the
context (a learned prompt for the domain)."""
MEMORY_BASELINES = ("no-context", "full", "window", OTHER_MEMORY)


def comparison(method: Method, baselines: tuple[str, ...], t: int) -> list[tuple[str, Method, bool]]:
    """The methods of one table row group: the method, and the named baselines at the same t (the window at the
    method's memory budget: n slots for merge, n * t for concat). Each with whether it reads another episode's
    chunks (:data:`OTHER_MEMORY`)."""
    own = method.name if not method.trainable else f"{method.name} (trained)"
    rows = [(own, method, False)]
    for name in baselines:
        if name == OTHER_MEMORY:
            rows.append((f"{own}, another episode's memory", method, True))
        elif name != "window":
            rows.append((name, build_method(name), False))
        elif hasattr(method, "memory_slots"):  # a compressed memory whose budget the window gets
            budget = method.memory_slots(t)
            sinks = min(4, budget // 2)
            window = build_method("window", slots=budget, sinks=sinks)
            rows.append((f"window ({sinks} sinks, {budget} slots)", window, False))
    return rows


def other_memory(episodes: list[EpisodeTokens]) -> list[EpisodeTokens]:
    """Each episode's query and answer after the chunks of the next episode (cyclically)."""
    n = len(episodes)
    return [EpisodeTokens(episodes[(i + 1) % n].chunks, e.query, e.answer, e.options) for i, e in enumerate(episodes)]


def run_memory_eval(
    model,
    tokenizer,
    method: Method,
    token_ids: dict,
    episodes,
    steps: tuple[int, ...] = STEPS,
    max_episodes: int = 40,
    batch_size: int = 4,
    baselines: tuple[str, ...] = (),
    verify: bool = False,
) -> list[dict]:
    """Rows (method, t) of the online-memory table. ``episodes`` are :class:`kvcondense.data.Episode`."""
    steps = tuple(sorted(set(steps)))
    usable = [e for e in episodes if len(e.chunks) >= steps[-1]][:max_episodes]
    if not usable:
        longest = max((len(e.chunks) for e in episodes), default=0)
        raise UsageError(f"no episode has {steps[-1]} chunks (the longest has {longest}); lower --steps")
    tokens = [tokenize_episode(e, tokenizer) for e in usable]
    per_slot = bytes_per_slot(model)
    task = "accuracy" if tokens[0].options else "perplexity"
    rows = []
    for t in tqdm(steps, desc="memory eval (t)"):
        cut = [e.truncated(t) for e in tokens]
        for label, m, other in comparison(method, baselines, t):
            s = score_episodes(model, m, token_ids, other_memory(cut) if other else cut, batch_size)
            row = {
                "method": m.name,
                "label": label,
                "params": m.params(),
                "task": "memory",
                "kind": "memory",
                "metric": task,
                "t": t,
                **({"other_memory": True} if other else {}),
                "episodes": s.episodes,
                "kv_slots": s.slots / s.episodes,
                "kv_mb": s.slots / s.episodes * per_slot / 2**20,
            }
            if task == "accuracy":
                row["accuracy"] = s.correct / s.episodes
            else:
                row["perplexity"] = math.exp(s.nll / max(1, s.tokens))
                row["tokens_scored"] = s.tokens
            rows.append(row)
    if verify:  # the parallel training forward against the recursive online inference with real eviction
        lay = method.episode_layout(tokens[0].truncated(steps[-1]), token_ids)
        with torch.no_grad():
            rows[0]["verify"] = {"max_abs_diff": max_abs_diff(model, lay, chunk_size=16)}
    return rows


def format_memory_table(rows: list[dict]) -> str:
    """One line per (t, method): the metric and the KV memory."""
    metric = rows[0]["metric"]
    head = f"{'t':>3} {'method':<34} {metric:>10} {'KV slots':>9} {'KV MiB':>8} {'episodes':>8}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(
            f"{r['t']:>3} {r['label']:<34} {r[metric]:>10.3f} {r['kv_slots']:>9.1f} {r['kv_mb']:>8.3f} "
            f"{r['episodes']:>8}"
        )
    if "verify" in rows[0]:
        out.append(f"verify (parallel vs online): max_abs_diff {rows[0]['verify']['max_abs_diff']:.2e}")
    return "\n".join(out)
