"""Negotiation in the spirit of CHAI (Verma et al. 2022): sell an item to a scripted buyer with a hidden budget.

The agent is the seller. The list price is always ``LIST_PRICE`` (100), so a price in hundredths is its reward.
An instance is a hidden ``(budget, opening offer, patience)``: every combination of ``BUDGETS``,
``OPENING_OFFERS`` and ``PATIENCE`` in that (``itertools.product``) order, 165 in all.

Text:
  first observation: ``"list price 100. buyer offers 35."``
  action:            ``"i can do 85"`` (ask a price: an integer 1 .. 100 written plainly, no leading zero),
                     ``"deal"`` (take the buyer's standing offer) or ``"no deal"`` (walk away); surrounding
                     whitespace and case are ignored, any other text is malformed.
  observation:       ``"buyer offers 43."`` (a counteroffer; ``" my last offer."`` is appended when the next
                     rejection makes the buyer walk away), ``"buyer accepts 85."``, ``"deal at 43."``,
                     ``"no deal."`` or ``"buyer walks away."``; after a malformed action, ``"i do not
                     understand. "`` followed by the buyer's unchanged offer (or by ``"buyer walks away."``).
Buyer (fixed, deterministic rules):
  - it accepts any ask at or below its budget, at the asked price (even one below its own offer);
  - it rejects a higher ask, which uses up one unit of its patience, and counters by raising its offer by a
    quarter of the gap to its budget, rounded down (``raise_offer``). The raise leaks the room left: after a
    raise ``d`` from offer ``o`` the budget lies in ``o + 4d .. o + 4d + 3``, and as budgets are multiples of
    ``PRICE_STEP`` exactly one of those four prices is a possible budget. Yet the offer itself closes only a
    quarter of the gap per round, so waiting for the buyer to come up leaves money on the table;
  - a malformed action costs ``MALFORMED_PENALTY`` and one unit of patience, and the buyer repeats its offer;
  - when its patience is used up it walks away. Patience (2 .. 6 rejections) is hidden, but the counteroffer
    that leaves one unit says so (``"my last offer."``).
Rewards: agreed price / list price on the action that closes a deal (``"deal"``, or an ask the buyer accepts);
0 on every other action, and when the buyer walks away or the seller says ``"no deal"``; a malformed action
earns ``-MALFORMED_PENALTY`` instead. Every action that does not end the episode uses one unit of patience, so
no episode outlasts ``MAX_TURNS`` (6) actions and none is ever truncated; the worst return (every action
malformed) is ``-MALFORMED_PENALTY * MAX_TURNS`` = -0.6.

The reference seller asks the list price, reads the budget off the buyer's first counteroffer and asks exactly
that (``reference_action``). A buyer never pays more than its budget, so on no instance can a seller earn more
than the budget over 100: the reference earns it on every instance, and its mean return (0.75) is the optimum.

Dataset: a mix of seller styles drawn per episode (``STYLE_WEIGHTS``), none of which reads the counteroffers:
stubborn (asks near the list price every turn; walked away from by every buyer below it), conceder (one
middling ask, then takes whatever the buyer counters), random (random asks, deals, walk-aways and malformed
text) and haggler (concedes a fixed ``HAGGLE_STEP`` per turn from the list price and takes the buyer's offer
once it meets the ask or is the buyer's last). The random seller's asks cover every budget, so the data holds
the pieces of the reference's play (the probe at the list price; asks at the budget after a counteroffer), but
the whole of it only where a style's fixed asks happen to hit the budget (the haggler's 100, then 90).
"""

from __future__ import annotations

import itertools
import re
from typing import Mapping, NamedTuple

import numpy as np

from jaxrl_lm.envs.base import Policy, Transcript
from jaxrl_lm.envs.tasks import TaskSpec, register_task

LIST_PRICE = 100
PRICE_STEP = 5  # budgets and opening offers are multiples of this; so is every price a scripted seller asks
BUDGETS = tuple(range(50, LIST_PRICE + 1, PRICE_STEP))  # 50 .. 100: a budget at the list price takes any ask
OPENING_OFFERS = (30, 35, 40)  # at least 10 below every budget, so the first counteroffer always rises
PATIENCE = (2, 3, 4, 5, 6)  # rejections the buyer takes; at least 2, so one counteroffer can always be read
# The buyer raises its offer by 1/RAISE_DIVISOR of the gap to its budget: slow to close the gap, yet (being at most
# PRICE_STEP) the raise's rounding hides less than one PRICE_STEP of the budget, so one counteroffer pins it down.
RAISE_DIVISOR = 4
MAX_TURNS = max(PATIENCE)  # every action closes the episode or uses one unit of patience
MALFORMED_PENALTY = 0.1  # small beside a price (0.01 .. 1.0); a malformed action also costs one unit of patience
DEAL, NO_DEAL = "deal", "no deal"
_ASK = re.compile(r"i can do ([1-9][0-9]{0,2})")

# Behaviour styles: the weight of each, and their settings (prices in the list price's units).
STYLE_WEIGHTS = {"stubborn": 0.25, "conceder": 0.25, "random": 0.25, "haggler": 0.25}
STUBBORN_ASKS = (LIST_PRICE, LIST_PRICE - PRICE_STEP)  # one drawn per episode, asked every turn
CONCEDER_ASKS = (60, 65, 70, 75)  # the conceder's one ask (drawn per episode) before it takes the buyer's offer
STYLE_ASKS = {"stubborn": STUBBORN_ASKS, "conceder": CONCEDER_ASKS}  # styles with an ask fixed per episode
HAGGLE_STEP = 10  # the haggler asks 100, 90, 80, ...
RANDOM_ASKS = tuple(range(OPENING_OFFERS[0], LIST_PRICE + 1, PRICE_STEP))  # every budget among them
RANDOM_DEAL, RANDOM_NO_DEAL, RANDOM_MALFORMED = 0.15, 0.05, 0.1  # the random seller's move odds; else it asks
# Malformed texts the random seller writes, so that the data shows the penalty: unparseable, or out of range.
MALFORMED_EXAMPLES = ("i can do", "ok", "i can do 0", "i can do 150", "deal 80")


class Buyer(NamedTuple):
    """The buyer's whole state: hidden budget and patience left, and its standing (shown) offer."""

    budget: int
    offer: int
    patience: int


class Move(NamedTuple):
    """A parsed action: ``kind`` is ``"ask"`` (with ``price``), ``"deal"``, ``"no deal"`` or ``"malformed"``."""

    kind: str
    price: int = 0


INSTANCES = tuple(Buyer(b, o, p) for b, o, p in itertools.product(BUDGETS, OPENING_OFFERS, PATIENCE))


def parse_move(action: str) -> Move:
    """The move an action text makes; any other text, or an ask outside ``1 .. LIST_PRICE``, is malformed."""
    text = action.strip().lower()
    if text in (DEAL, NO_DEAL):
        return Move(text)
    match = _ASK.fullmatch(text)
    if match is not None and int(match.group(1)) <= LIST_PRICE:
        return Move("ask", int(match.group(1)))
    return Move("malformed")


def ask_text(price: int) -> str:
    """The canonical ask for a price."""
    return f"i can do {price}"


def raise_offer(buyer: Buyer) -> int:
    """The buyer's next offer after a rejected ask: a quarter of the gap to its budget higher, rounded down."""
    return buyer.offer + (buyer.budget - buyer.offer) // RAISE_DIVISOR


def offer_text(offer: int, patience: int) -> str:
    """The buyer's standing offer, flagged when one more rejection makes it walk away."""
    return f"buyer offers {offer}." + (" my last offer." if patience == 1 else "")


def opening_text(buyer: Buyer) -> str:
    """First observation of an episode."""
    return f"list price {LIST_PRICE}. " + offer_text(buyer.offer, buyer.patience)


def respond(buyer: Buyer, move: Move) -> tuple[Buyer, str, float, bool]:
    """The buyer's answer to one move: ``(next state, observation text, reward, done)``.

    The one statement of the rules: the env steps with it and the reference seller's belief replays it.
    """
    if move.kind == DEAL:
        return buyer, f"deal at {buyer.offer}.", buyer.offer / LIST_PRICE, True
    if move.kind == NO_DEAL:
        return buyer, "no deal.", 0.0, True
    if move.kind == "ask" and move.price <= buyer.budget:
        return buyer, f"buyer accepts {move.price}.", move.price / LIST_PRICE, True
    malformed = move.kind == "malformed"
    reward = -MALFORMED_PENALTY if malformed else 0.0
    prefix = "i do not understand. " if malformed else ""
    patience = buyer.patience - 1
    if patience == 0:
        return buyer._replace(patience=0), prefix + "buyer walks away.", reward, True
    offer = buyer.offer if malformed else raise_offer(buyer)
    return Buyer(buyer.budget, offer, patience), prefix + offer_text(offer, patience), reward, False


class NegotiationEnv:
    """One negotiation; seed ``i`` plays instance ``i % num_instances`` (``INSTANCES`` order)."""

    def __init__(self) -> None:
        self.num_instances = len(INSTANCES)
        self.buyer = INSTANCES[0]
        self.opening = ""  # the episode's first observation
        self.history: list[tuple[Move, str]] = []  # (move, observation) as the transcript shows them
        self.done = True

    @property
    def turn(self) -> int:
        """Actions taken so far this episode."""
        return len(self.history)

    @property
    def offer(self) -> int:
        """The buyer's standing offer (the last one the transcript shows)."""
        return self.buyer.offer

    @property
    def last_call(self) -> bool:
        """Whether the transcript's last observation said ``"my last offer."``."""
        return self.buyer.patience == 1

    def reset(self, seed: int) -> str:
        self.buyer = INSTANCES[seed % self.num_instances]
        self.opening = opening_text(self.buyer)
        self.history = []
        self.done = False
        return self.opening

    def step(self, action: str) -> tuple[str, float, bool]:
        if self.done:
            raise RuntimeError("NegotiationEnv.step called on a finished episode; call reset(seed) first")
        move = parse_move(action)
        self.buyer, observation, reward, self.done = respond(self.buyer, move)
        self.history.append((move, observation))
        return observation, reward, self.done


def candidate_budgets(opening: str, history: list[tuple[Move, str]]) -> list[int]:
    """Budgets of the instances that would have shown exactly this transcript, ascending: what a seller who
    knows the buyer's rules can tell from the text alone."""
    budgets = set()
    for buyer in INSTANCES:
        if opening_text(buyer) != opening:
            continue
        for move, observation in history:
            buyer, shown, _, _ = respond(buyer, move)
            if shown != observation:
                break
        else:
            budgets.add(buyer.budget)
    return sorted(budgets)


def reference_action(opening: str, history: list[tuple[Move, str]], offer: int, last_call: bool) -> str:
    """The reference seller's next action: ask the list price until the counteroffers pin the budget down (one
    counteroffer does), then ask the budget. On the buyer's last call with the budget still open it asks the
    lowest budget left, which every buyer left accepts; never less than the buyer's own offer (then ``"deal"``)."""
    budgets = candidate_budgets(opening, history)
    if not budgets:
        raise ValueError(f"no instance fits the transcript {opening!r} then {history}")
    if len(budgets) > 1 and not last_call:
        return ask_text(LIST_PRICE)
    return ask_text(budgets[0]) if budgets[0] > offer else DEAL


def optimal_policy() -> Policy:
    """The reference seller (reads the moves and answers the env has shown, not the hidden budget or patience)."""

    def act(transcripts: list[Transcript]) -> list[str]:
        return [reference_action(t.env.opening, t.env.history, t.env.offer, t.env.last_call) for t in transcripts]

    return act


def behaviour_policy(seed: int, styles: Mapping[str, float] = STYLE_WEIGHTS) -> Policy:
    """A seller of a style drawn per episode with weights ``styles`` (names: the keys of ``STYLE_WEIGHTS``; see
    the module docstring), every random choice drawn from ``seed``. ``{name: 1.0}`` plays one style alone.

    A style and its ask are drawn when an episode's first action is due (``env.turn == 0``) and kept, by rollout
    slot, until that episode ends; the rollout asks for actions in slot order, so the draws are reproducible.
    """
    unknown = sorted(set(styles) - set(STYLE_WEIGHTS))
    if unknown or not styles:
        raise ValueError(f"behaviour_policy: styles must be among {sorted(STYLE_WEIGHTS)}, got {sorted(styles)}")
    names = list(styles)
    weights = np.array([styles[name] for name in names], dtype=np.float64)
    rng = np.random.default_rng(seed)
    sellers: dict[int, tuple[str, int]] = {}  # rollout slot -> (style, its ask for the episode; 0: none)

    def act(transcripts: list[Transcript]) -> list[str]:
        actions = []
        for t in transcripts:
            if t.env.turn == 0:
                style = names[rng.choice(len(names), p=weights / weights.sum())]
                asks = STYLE_ASKS.get(style)
                sellers[t.index] = (style, int(asks[rng.integers(len(asks))]) if asks else 0)
            style, ask = sellers[t.index]
            actions.append(_style_action(style, ask, t.env, rng))
        return actions

    return act


def _style_action(style: str, ask: int, env: NegotiationEnv, rng: np.random.Generator) -> str:
    """The next action of a seller of ``style``; ``ask`` is its per-episode ask (stubborn and conceder)."""
    if style == "stubborn":
        return ask_text(ask)
    if style == "conceder":
        return ask_text(ask) if env.turn == 0 else DEAL
    if style == "haggler":
        current = LIST_PRICE - HAGGLE_STEP * env.turn
        return DEAL if env.last_call or env.offer >= current else ask_text(current)
    u = rng.random()  # random
    if u < RANDOM_DEAL:
        return DEAL
    if u < RANDOM_DEAL + RANDOM_NO_DEAL:
        return NO_DEAL
    if u < RANDOM_DEAL + RANDOM_NO_DEAL + RANDOM_MALFORMED:
        return MALFORMED_EXAMPLES[rng.integers(len(MALFORMED_EXAMPLES))]
    return ask_text(int(RANDOM_ASKS[rng.integers(len(RANDOM_ASKS))]))


register_task(
    TaskSpec(
        name="negotiation",
        make_env=NegotiationEnv,
        behaviour=behaviour_policy,
        optimal=optimal_policy,
        data_steps=MAX_TURNS,
        eval_steps=MAX_TURNS,
        worst_return=-MALFORMED_PENALTY * MAX_TURNS,
    )
)
