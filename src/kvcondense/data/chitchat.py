"""The built-in ``chitchat`` dialogue episodes: real two-person chats from the ``chitchat-dataset==0.9.0`` wheel (MIT).

The wheel is fetched (not installed) and ``chitchat_dataset/dataset.json`` is read with ``zipfile``: a dict from
conversation id to ``{"messages": [[{"text", "sender", "timestamp"}, ...], ...], ...}``. Consecutive messages of
one sender are merged into one turn (joined with a space, empty messages dropped); the first sender is speaker
``A``. One episode per conversation with two or more turns, split by conversation id.

Measured: 7,168 conversations in the file, 3,151 of them a single turn after merging (one sender, no reply);
4,017 episodes of 2 to 564 turns, 135,565 turns in all, median turn length 61 characters. Chunks per episode
(turns - 1): median 16; 2,655 episodes have >= 8 chunks and 2,059 have >= 16. Split: 3,222 train, 400 validation,
395 test episodes.
"""

from __future__ import annotations

import json
import zipfile

from ..fetch import fetch_package
from .episodes import Episode, dialogue_episode

PACKAGE, VERSION = "chitchat-dataset", "0.9.0"
MEMBER = "chitchat_dataset/dataset.json"


def conversation_turns(conversation: dict) -> list[str]:
    """The turns of one conversation: consecutive messages of one sender merged, empty messages dropped."""
    turns: list[str] = []
    last_sender = None
    for group in conversation["messages"]:
        for message in group:
            text = " ".join(message["text"].split())
            if not text:
                continue
            if message["sender"] == last_sender:
                turns[-1] += " " + text
            else:
                turns.append(text)
                last_sender = message["sender"]
    return turns


def load_conversations() -> dict[str, list[str]]:
    """Conversation id -> its turns, for every conversation in the wheel (in the file's order)."""
    with zipfile.ZipFile(fetch_package(PACKAGE, VERSION)) as zf:
        data = json.loads(zf.read(MEMBER))
    return {cid: conversation_turns(conv) for cid, conv in data.items()}


def chitchat_episodes(seed: int = 0) -> list[tuple[str, Episode]]:
    """(``chitchat:<conversation id>``, episode) for each conversation of >= 2 turns; ``seed`` is unused."""
    del seed  # the episodes are the conversations themselves; nothing is sampled
    return [(f"chitchat:{cid}", dialogue_episode(t)) for cid, t in load_conversations().items() if len(t) >= 2]
