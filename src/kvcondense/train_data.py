"""Training examples: text blocks, online episodes, and episodes read as a prompt and its continuation; each laid
out by the method for one step (:func:`block_layout`)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from .data.episodes import truncation
from .errors import UsageError
from .layout import Layout, with_continuation
from .methods import EpisodeTokens, Method, TokenizedText, tokenize, tokenize_episode
from .scoring import method_layout
from .train_config import TrainConfig


@dataclass
class Prompted:
    """An episode read as text by a method that compresses at the prompt's end (``scored``, ``scored-heads``):
    its chunks joined are the prompt, compressed once read; its query and answer follow as a plain continuation
    that reads what was kept (the recall facts, then the question and its answer)."""

    prompt: TokenizedText
    continuation: torch.Tensor


def text_blocks(docs, tokenizer, block_tokens: int) -> list[TokenizedText]:
    """Tokenize documents and cut each into blocks of ``block_tokens`` text tokens (a short tail is kept if it
    is at least half a block)."""
    blocks = []
    for doc in docs:
        toks = tokenize(doc.text, tokenizer)
        for lo in range(0, len(toks), block_tokens):
            block = toks[lo : lo + block_tokens]
            if len(block) >= max(2, block_tokens // 2):
                blocks.append(block)
    return blocks


def _fit(tok: EpisodeTokens, budget: int) -> int:
    """How many of an episode's chunks (the last ones, the evidence kept) fit ``budget`` tokens beside its query
    and answer; 0 if none does."""
    room = budget - len(tok.query) - len(tok.answer)
    keep = len(tok.chunks)
    while keep and sum(len(c) for c in tok.truncated(keep).chunks) > room:
        keep -= 1
    return keep if room > 0 else 0


def episode_items(episodes, tokenizer, budget: int) -> list[EpisodeTokens]:
    """Tokenize episodes; drop the oldest chunks until the text of chunks + query + answer fits ``budget`` tokens
    (episodes whose query and answer alone do not fit are skipped)."""
    items = []
    for ep in episodes:
        tok = tokenize_episode(ep, tokenizer)
        if keep := _fit(tok, budget):
            items.append(tok.truncated(keep))
    return items


def episode_prompts(episodes, tokenizer, budget: int) -> list[Prompted]:
    """Episodes as prompts and continuations (:class:`Prompted`), chunks dropped to fit ``budget`` tokens as in
    :func:`episode_items`; the kept chunks are joined and tokenized as one text, as ``eval --task qa`` reads them."""
    items = []
    for ep in episodes:
        tok = tokenize_episode(ep, tokenizer)
        if keep := _fit(tok, budget):
            chunks, _ = truncation(len(ep.chunks), keep, ep.evidence)
            text = "".join(ep.chunks[i] for i in chunks)
            items.append(Prompted(tokenize(text, tokenizer), torch.cat([tok.query, tok.answer])))
    return items


def batches(blocks: list, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """Endless stream of (epoch, list of (block index, block)), reshuffled every epoch; each process takes its
    own slice of every global batch. Refused at once when the data holds less than one global batch."""
    if len(blocks) < batch_size * world:  # not one batch in an epoch: the stream would look for one forever
        raise UsageError(
            f"the data makes {len(blocks)} training examples, fewer than one batch of {batch_size * world} "
            f"(--batch-size {batch_size} x {world} processes); give more text, smaller --block-tokens or batches"
        )
    return _epochs(blocks, batch_size, seed, rank, world)


def _epochs(blocks: list, batch_size: int, seed: int, rank: int, world: int):
    epoch = 0
    global_bs = batch_size * world
    while True:
        order = list(range(len(blocks)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for lo in range(0, len(order) - global_bs + 1, global_bs):
            mine = order[lo + rank * batch_size : lo + (rank + 1) * batch_size]
            yield epoch, [(i, blocks[i]) for i in mine]
        epoch += 1


def block_layout(model, method: Method, cfg: TrainConfig, block, token_ids: dict[str, int], seed: int) -> Layout:
    """One example's layout: an online episode (:class:`EpisodeTokens`, CCM), an episode read as a prompt and its
    continuation (:class:`Prompted`), or a text block; with ``cfg.sample_ratios`` the ratio of a text block or a
    prompt is drawn from them (fixed by ``seed``), with ``cfg.sample_chunks`` an episode is cut to its last T chunks,
    T drawn likewise; with ``cfg.continuation_tokens`` the method lays out a text
    block's start and the rest follows as plain text. A method that reads token scores gets them from ``model`` as
    it is at this step (:mod:`kvcondense.scoring`)."""
    if isinstance(block, EpisodeTokens):
        if cfg.sample_chunks:
            t = random.Random(f"chunks:{seed}").choice(cfg.sample_chunks)
            block = block.truncated(min(t, len(block.chunks)))
        return method.episode_layout(block, token_ids)
    if cfg.sample_ratios:
        method = dataclasses.replace(method, ratio=random.Random(seed).choice(cfg.sample_ratios))
    if isinstance(block, Prompted):
        return with_continuation(method_layout(model, method, block.prompt, token_ids, seed=seed), block.continuation)
    if not cfg.continuation_tokens:
        return method_layout(model, method, block, token_ids, seed=seed)
    cut = len(block) - cfg.continuation_tokens
    return with_continuation(method_layout(model, method, block[:cut], token_ids, seed=seed), block.ids[cut:])
