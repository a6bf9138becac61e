"""The requests of the routing benchmark: tenants' system prompts, chat sessions, their timing.

Everything is drawn from a seeded ``random.Random``, so one round sends every target exactly
the same sessions at the same offsets (the replies differ only if a target answers
differently). Two scripts:

* :func:`shared_prefix_script`: Poisson arrivals of chat sessions. A session belongs to one of
  ``tenants`` tenants (Zipf-distributed popularity) and opens with that tenant's long system
  prompt; it runs several turns one after the other, each turn's prompt being the whole
  conversation so far (system, then user and assistant messages) plus a new user message,
  with a think time after each answer.
* :func:`unique_prompt_script`: Poisson arrivals of single-turn chats whose prompts share
  nothing beyond the role prefix, for the heterogeneous fleet.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Words for filler text; prompts are text the simulator tokenises at 4 characters per token.
_WORDS = (
    "account",
    "answer",
    "batch",
    "cache",
    "cluster",
    "config",
    "context",
    "customer",
    "data",
    "deploy",
    "document",
    "error",
    "event",
    "field",
    "format",
    "gateway",
    "guide",
    "handle",
    "index",
    "invoice",
    "latency",
    "limit",
    "log",
    "metric",
    "model",
    "network",
    "order",
    "policy",
    "prompt",
    "queue",
    "quota",
    "record",
    "region",
    "reply",
    "request",
    "route",
    "schema",
    "server",
    "service",
    "session",
    "status",
    "stream",
    "support",
    "table",
    "tenant",
    "ticket",
    "token",
    "trace",
    "update",
    "user",
    "value",
    "version",
    "window",
    "worker",
)


@dataclass(frozen=True)
class Turn:
    """One request of a session: the new user message, the reply length, the pause after."""

    user: str
    max_tokens: int
    think_s: float


@dataclass(frozen=True)
class Session:
    """A conversation starting ``start_s`` into the segment; ``system`` may be empty."""

    session_id: str  # unique across rounds: "<seed>-<index>"
    tenant: int | None
    start_s: float
    system: str
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class SharedPrefixShape:
    """Scenario 1's knobs. Defaults: 16 tenants, system prompts of 2,000-4,000 characters,
    Zipf exponent 0.8, 2-6 turns, user messages of 150-600 characters, replies of 16-48
    tokens, think time exponential with mean 0.5 s (capped at 2 s)."""

    sessions_per_s: float
    tenants: int = 16
    system_chars: tuple[int, int] = (2000, 4000)
    zipf_s: float = 0.8
    turns: tuple[int, int] = (2, 6)
    user_chars: tuple[int, int] = (150, 600)
    max_tokens: tuple[int, int] = (16, 48)
    think_mean_s: float = 0.5
    think_max_s: float = 2.0


@dataclass(frozen=True)
class UniquePromptShape:
    """Scenario 2's knobs. Defaults: prompts of 400-2,000 characters, replies of 24-72 tokens."""

    requests_per_s: float
    prompt_chars: tuple[int, int] = (400, 2000)
    max_tokens: tuple[int, int] = (24, 72)


@dataclass
class Script:
    """Sessions in start order, and the tenants' system prompts they use."""

    sessions: list[Session]
    system_prompts: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


def filler(rng: random.Random, chars: int) -> str:
    """Roughly ``chars`` characters of random words (never empty)."""
    words: list[str] = []
    length = 0
    while length < chars:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)


def system_prompts(seed: int, shape: SharedPrefixShape) -> list[str]:
    """One system prompt per tenant; each opens with its tenant number, so they differ at once."""
    rng = random.Random(seed)
    prompts = []
    for tenant in range(shape.tenants):
        chars = rng.randint(*shape.system_chars)
        head = f"You are the assistant of tenant {tenant:02d}. Follow these rules. "
        prompts.append(head + filler(rng, chars - len(head)))
    return prompts


def zipf_weights(count: int, s: float) -> list[float]:
    """Popularity of ranks 1..count: ``1 / rank**s``, normalised to sum 1."""
    raw = [1.0 / (rank**s) for rank in range(1, count + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def _arrivals(rng: random.Random, rate_per_s: float, until_s: float) -> list[float]:
    times, now = [], rng.expovariate(rate_per_s)
    while now < until_s:
        times.append(now)
        now += rng.expovariate(rate_per_s)
    return times


def shared_prefix_script(
    seed: int, shape: SharedPrefixShape, prompts: list[str], until_s: float
) -> Script:
    """Sessions arriving over ``until_s`` seconds; tenants drawn by Zipf popularity."""
    rng = random.Random(seed)
    weights = zipf_weights(shape.tenants, shape.zipf_s)
    # Which tenant is the popular one is itself drawn, so no tenant number is special.
    ranked = list(range(shape.tenants))
    rng.shuffle(ranked)
    sessions = []
    for index, start in enumerate(_arrivals(rng, shape.sessions_per_s, until_s)):
        tenant = ranked[rng.choices(range(shape.tenants), weights)[0]]
        turns = tuple(
            Turn(
                user=f"[session {seed}-{index} turn {turn}] "
                + filler(rng, rng.randint(*shape.user_chars)),
                max_tokens=rng.randint(*shape.max_tokens),
                think_s=min(rng.expovariate(1.0 / shape.think_mean_s), shape.think_max_s),
            )
            for turn in range(rng.randint(*shape.turns))
        )
        sessions.append(Session(f"{seed}-{index}", tenant, start, prompts[tenant], turns))
    return Script(sessions, prompts)


def unique_prompt_script(seed: int, shape: UniquePromptShape, until_s: float) -> Script:
    """Single-turn sessions with prompts unique from their first characters."""
    rng = random.Random(seed)
    sessions = []
    for index, start in enumerate(_arrivals(rng, shape.requests_per_s, until_s)):
        user = f"{rng.getrandbits(64):016x} request {seed}-{index}. " + filler(
            rng, rng.randint(*shape.prompt_chars)
        )
        turn = Turn(user=user, max_tokens=rng.randint(*shape.max_tokens), think_s=0.0)
        sessions.append(Session(f"{seed}-{index}", None, start, "", (turn,)))
    return Script(sessions)
