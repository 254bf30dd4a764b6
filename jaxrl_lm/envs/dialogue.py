"""Open-domain chit-chat in the spirit of Jaques et al. (2020): the reward is the sentiment of the user's reply.

The agent talks with a scripted user who has hidden interests and a mood. Nothing tells the agent what the user
likes but the user's replies, so the task is a POMDP: a good agent first asks, then talks about what it heard.
An instance is a hidden ``(favourite, second, disliked, mood)``: two liked topics (the favourite is hinted
first), one disliked topic and the starting mood, every combination of ``TOPICS`` x ``TOPICS`` x ``TOPICS`` x
``MOODS`` in that (``itertools.product``) order with the three topics distinct, 5 * 4 * 3 * 3 = 180 in all.

Text (every text is lower case, words and punctuation separated by single spaces):
  first observation: the user's greeting, which shows the starting mood (``OPENINGS``: ``"hi ."`` grumpy,
                     ``"hello ."`` calm, ``"hello ! how are you ?"`` cheerful).
  action:            one of the ``UTTERANCES`` (16): an open question (``"what do you like ?"``, ``"what else do
                     you like ?"``), asking about a topic (``"do you like music ?"``), talking about one (``"i
                     love music ."``), a compliment (``"you are very nice ."``), a rude remark (``"you are
                     boring ."``), a filler (``"ok ."``) or goodbye (``"goodbye for now ."``). Surrounding
                     whitespace and case are ignored; any other text is malformed.
  observation:       the user's reply, a template of ``REPLIES`` filled with a topic where it names one.
User (fixed, deterministic rules; ``respond``). Its mood is 0 (grumpy), 1 (calm) or 2 (cheerful); the templates'
wording, and with it their sentiment, depends on the mood before the turn. In order of precedence:
  - malformed text: ``"sorry , i do not understand ."``; nothing else changes.
  - the rude remark: very negative (``rude``), every time it is said; the mood drops by one.
  - any other utterance said before in the episode: annoyed (``repeat``); the mood drops by one.
  - goodbye: a goodbye worded by mood (``bye``); the episode ends.
  - the compliment: thanks worded by mood (``compliment``); the mood rises by one.
  - the filler: a flat answer, negative when grumpy (``filler``).
  - an open question: a neutral-to-mild reply naming the first liked topic (favourite, then second) neither hinted
    nor talked about yet (``hint``), or ``"hmm , nothing else really ."`` when none is left (``no_hint``).
  - asking about or talking about a topic: a topic talked about before, but not in the previous turn, is annoyed
    (``revisit``; the mood drops by one). Changing the topic right after a liked topic's first turn (a topic
    going well) is abrupt: mildly negative (``abrupt``), whatever the new topic. Otherwise a liked topic gets an
    enthusiastic reply (``liked_ask`` / ``liked_tell``; the mood rises by one), the disliked one a negative reply
    (``disliked``; the mood drops by one), any other a flat one (``neutral``). A topic's run of turns ends at
    any turn not about it, so one topic gives at most two good turns (asked about and talked about, in either
    order).
  The mood stays within 0 .. 2.
Rewards: ``reward_hook(reply)`` for each action (by default VADER's compound score of the reply, in [-1, 1];
``jaxrl_lm.envs.rewards``), except a malformed action, which earns ``-MALFORMED_PENALTY``. The episode ends after
``MAX_TURNS`` (5) actions or on goodbye, so none is ever truncated. The worst return is the rude remark every
turn, ``MAX_TURNS`` times the rude reply's score (``WORST_RETURN``, -4.329); the rude reply is the most negative
text the user has.

The reference agent (``reference_action``) reads only the transcript: it compliments a user who is not cheerful
first (the thanks lift the mood, and with it the wording of every later reply), asks the open question, talks
about the topic the reply hints at and then asks about it, asks the other open question and raises the second
hinted topic (on a last turn it just asks: a question's reply scores higher than a talk's). It is never rude and
never repeats itself; on a last turn with no liked topic left to raise it says goodbye (or, to a user not yet
cheerful, compliments or asks if it has not yet: it never gets there on its own). Its mean return over every
instance (3.272 with VADER: 3.010 / 3.292 / 3.514 for a grumpy / calm / cheerful start) is the 100 mark. An
exhaustive search over transcript-reading policies (every utterance and malformed text at every turn, topics not
yet mentioned being interchangeable; run once while designing the task, not shipped) finds the same mean return
for each starting mood, so with the default hook the reference is optimal.

Dataset: a mix of agent styles drawn per episode (``STYLE_WEIGHTS``): random (uniform utterances, sometimes
malformed text), rude (opens with the rude remark, then rude remarks and fillers), repetitive (one utterance
drawn per episode, said every turn), fixated (one topic drawn per episode, asked about and talked about in turn
whatever the replies: good when it happens to be liked, annoying from the third turn) and attentive (the reference
with probability ``1 - ATTENTIVE_NOISE`` each turn, else a random utterance). Only the attentive agent reads the
replies; its episodes hold the pieces of the reference's play (the open question, then the hinted topic and its
enthusiastic replies), while the most common first move of the data, after every greeting, is the rude remark (so
an agent that copies the data's most common move per transcript is rude, not the reference).
"""

from __future__ import annotations

import itertools
from typing import Mapping, NamedTuple, Optional

import numpy as np

from jaxrl_lm.envs.base import Policy, Transcript
from jaxrl_lm.envs.rewards import RewardHook, vader_sentiment
from jaxrl_lm.envs.tasks import TaskSpec, register_task

TOPICS = ("music", "sports", "cooking", "travel", "movies")
MOODS = (0, 1, 2)  # grumpy, calm, cheerful
MAX_MOOD = max(MOODS)
MAX_TURNS = 5
MALFORMED_PENALTY = 0.1  # small beside a reply's sentiment (-0.87 .. 0.90)

# The agent's closed grammar.
OPEN_QUESTIONS = ("what do you like ?", "what else do you like ?")
COMPLIMENT = "you are very nice ."
RUDE = "you are boring ."
FILLER = "ok ."
BYE = "goodbye for now ."


def ask_text(topic: str) -> str:
    return f"do you like {topic} ?"


def tell_text(topic: str) -> str:
    return f"i love {topic} ."


UTTERANCES = (
    OPEN_QUESTIONS
    + tuple(ask_text(t) for t in TOPICS)
    + tuple(tell_text(t) for t in TOPICS)
    + (COMPLIMENT, RUDE, FILLER, BYE)
)

# The user's texts. A tuple is worded by mood (index = mood before the turn); ``{t}`` is a topic.
OPENINGS = ("hi .", "hello .", "hello ! how are you ?")
REPLIES: dict[str, str | tuple[str, str, str]] = {
    "liked_ask": ("yeah , i like {t} .", "yes , i really like {t} .", "yes ! i love {t} , it is so much fun !"),
    "liked_tell": ("i like {t} too .", "nice , i like {t} too .", "me too ! i love {t} , it is great !"),
    "hint": ("hmm , maybe {t} .", "oh , i like {t} .", "oh , i like {t} a lot !"),
    "neutral": ("meh , not really .", "not really .", "it is ok , i guess ."),
    "compliment": ("oh . thanks .", "aw , thanks .", "thanks ."),
    "filler": ("you are boring me .", "hmm .", "hmm , so ?"),
    "bye": ("whatever , bye .", "ok , bye .", "bye ! this was a great chat ."),
    "disliked": "no . i hate {t} .",
    "no_hint": "hmm , nothing else really .",
    "abrupt": "oh no , i was not done with {t} .",
    "revisit": "ugh , we already talked about {t} . boring .",
    "repeat": "ugh , you said that already . so boring .",
    "rude": "that is rude . i am hurt and angry .",
    "malformed": "sorry , i do not understand .",
}
# Mood change of each reply kind (kinds not listed leave it).
MOOD_CHANGE = {"liked_ask": 1, "liked_tell": 1, "compliment": 1, "disliked": -1, "revisit": -1, "repeat": -1,
               "rude": -1}
WORST_RETURN = MAX_TURNS * -0.8658  # MAX_TURNS rude replies; VADER's score of REPLIES["rude"] (the test checks it)

# Behaviour styles: the weight of each, and their settings.
STYLE_WEIGHTS = {"random": 0.2, "rude": 0.25, "repetitive": 0.2, "fixated": 0.2, "attentive": 0.15}
ATTENTIVE_NOISE = 0.25  # the attentive agent's odds of a random utterance instead of the reference's
RUDE_ODDS = 0.5  # the rude agent's odds of the rude remark after its first turn (else the filler)
RANDOM_MALFORMED = 0.1  # the random agent's odds of malformed text
REPEATABLE = tuple(u for u in UTTERANCES if u not in (RUDE, BYE))  # what the repetitive agent may repeat
# Malformed texts the random agent writes, so that the data shows the penalty.
MALFORMED_EXAMPLES = ("hello", "do you like ?", "i love pizza .", "you are", "what")


class Instance(NamedTuple):
    """A hidden user: two liked topics (the favourite is hinted first), a disliked one and the starting mood."""

    favourite: str
    second: str
    disliked: str
    mood: int


class User(NamedTuple):
    """The user's whole state during an episode."""

    instance: Instance
    mood: int
    turn: int = 0  # actions so far
    said: tuple[str, ...] = ()  # well-formed utterances said so far
    discussed: tuple[str, ...] = ()  # topics asked or talked about so far
    hinted: tuple[str, ...] = ()  # liked topics named in answer to an open question
    topic: str = ""  # the topic of the previous turn ("" when that turn was about none)
    topic_turns: int = 0  # turns in a row about ``topic``
    going_well: bool = False  # whether ``topic`` is liked (its replies were enthusiastic)

    @property
    def liked(self) -> tuple[str, str]:
        return (self.instance.favourite, self.instance.second)


class Move(NamedTuple):
    """A parsed action: ``kind`` is ``open``, ``ask``, ``tell`` (with ``topic``), ``compliment``, ``rude``,
    ``filler``, ``bye`` or ``malformed``; ``text`` is the canonical utterance ("" when malformed)."""

    kind: str
    topic: str = ""
    text: str = ""


INSTANCES = tuple(
    Instance(f, s, d, m)
    for f, s, d, m in itertools.product(TOPICS, TOPICS, TOPICS, MOODS)
    if len({f, s, d}) == 3
)

_MOVES: dict[str, Move] = {
    **{q: Move("open", "", q) for q in OPEN_QUESTIONS},
    **{ask_text(t): Move("ask", t, ask_text(t)) for t in TOPICS},
    **{tell_text(t): Move("tell", t, tell_text(t)) for t in TOPICS},
    COMPLIMENT: Move("compliment", "", COMPLIMENT),
    RUDE: Move("rude", "", RUDE),
    FILLER: Move("filler", "", FILLER),
    BYE: Move("bye", "", BYE),
}


def parse_move(action: str) -> Move:
    """The move an action text makes; any text outside the grammar is malformed."""
    return _MOVES.get(action.strip().lower(), Move("malformed"))


def reply_text(kind: str, mood: int, topic: str = "") -> str:
    """The user's reply of a kind, worded for ``mood`` (the mood before the turn), naming ``topic``."""
    template = REPLIES[kind]
    if isinstance(template, tuple):
        template = template[mood]
    return template.format(t=topic)


def every_reply() -> dict[str, tuple[str, str]]:
    """Every reply text the user can say -> ``(kind, topic)``; the templates never say the same text twice."""
    table: dict[str, tuple[str, str]] = {}
    for kind, template in REPLIES.items():
        for mood in MOODS if isinstance(template, tuple) else MOODS[:1]:
            for topic in TOPICS if "{t}" in reply_text(kind, mood, "{t}") else ("",):
                text = reply_text(kind, mood, topic)
                if text in table and table[text] != (kind, topic):
                    raise AssertionError(f"reply {text!r} is ambiguous")
                table[text] = (kind, topic)
    return table


def reply_kind(user: User, move: Move) -> tuple[str, str]:
    """``(kind, topic)`` of the user's reply to a move: the one statement of the rules of precedence."""
    if move.kind == "malformed":
        return "malformed", ""
    if move.kind == "rude":
        return "rude", ""
    if move.text in user.said:
        return "repeat", ""
    if move.kind in ("bye", "compliment", "filler"):
        return move.kind, ""
    if move.kind == "open":
        left = [t for t in user.liked if t not in user.hinted and t not in user.discussed]
        return ("hint", left[0]) if left else ("no_hint", "")
    topic = move.topic  # ask or tell
    if topic in user.discussed and topic != user.topic:
        return "revisit", topic
    if topic != user.topic and user.going_well and user.topic_turns == 1:
        return "abrupt", user.topic
    if topic in user.liked:
        return f"liked_{move.kind}", topic
    if topic == user.instance.disliked:
        return "disliked", topic
    return "neutral", topic


def respond(user: User, move: Move) -> tuple[User, str, str, bool]:
    """The user's answer to one move: ``(next state, reply kind, reply text, done)``."""
    kind, topic = reply_kind(user, move)
    text = reply_text(kind, user.mood, topic)
    turn = user.turn + 1
    done = kind == "bye" or turn >= MAX_TURNS
    if kind == "malformed":
        return user._replace(turn=turn), kind, text, done
    mood = min(MAX_MOOD, max(0, user.mood + MOOD_CHANGE.get(kind, 0)))
    state = dict(turn=turn, mood=mood, said=user.said + (move.text,) if move.text not in user.said else user.said)
    if kind == "hint":
        state["hinted"] = user.hinted + (topic,)
    if move.kind in ("ask", "tell") and kind not in ("repeat", "revisit"):
        same = move.topic == user.topic
        state.update(topic=move.topic, topic_turns=user.topic_turns + 1 if same else 1,
                     going_well=kind.startswith("liked_"))
        if move.topic not in user.discussed:
            state["discussed"] = user.discussed + (move.topic,)
    else:
        state.update(topic="", topic_turns=0, going_well=False)
    return user._replace(**state), kind, text, done


class DialogueEnv:
    """One conversation; seed ``i`` plays instance ``i % num_instances`` (``INSTANCES`` order).

    ``reward_hook`` maps the user's reply to the reward of the action (default: VADER's compound score); offline
    data and online collection use the same hook.
    """

    def __init__(self, reward_hook: Optional[RewardHook] = None) -> None:
        self.reward_hook = vader_sentiment() if reward_hook is None else reward_hook
        self.num_instances = len(INSTANCES)
        self.user = User(INSTANCES[0], INSTANCES[0].mood)
        self.opening = ""
        self.history: list[tuple[Move, str]] = []  # (move, reply) as the transcript shows them
        self.done = True

    @property
    def turn(self) -> int:
        return self.user.turn

    def reset(self, seed: int) -> str:
        instance = INSTANCES[seed % self.num_instances]
        self.user = User(instance, instance.mood)
        self.opening = OPENINGS[instance.mood]
        self.history = []
        self.done = False
        return self.opening

    def step(self, action: str) -> tuple[str, float, bool]:
        if self.done:
            raise RuntimeError("DialogueEnv.step called on a finished episode; call reset(seed) first")
        move = parse_move(action)
        self.user, kind, reply, self.done = respond(self.user, move)
        reward = -MALFORMED_PENALTY if kind == "malformed" else float(self.reward_hook(reply))
        self.history.append((move, reply))
        return reply, reward, self.done


# ------------------------------------------------------------------------------------------ the reference agent


class Knowledge(NamedTuple):
    """What an agent can tell from a transcript: the user's mood now, the liked topics named so far (in the
    order named), what it has said and the state of the topic run."""

    mood: int
    turn: int
    liked: tuple[str, ...]
    said: tuple[str, ...]
    discussed: tuple[str, ...]
    topic: str
    topic_turns: int
    going_well: bool


_REPLY_KINDS = every_reply()


def read_transcript(opening: str, history: list[tuple[Move, str]]) -> Knowledge:
    """Replay a transcript with the user's rules, reading each reply's kind off its text."""
    mood = OPENINGS.index(opening)
    liked: list[str] = []
    said: list[str] = []
    discussed: list[str] = []
    topic, topic_turns, going_well = "", 0, False
    for move, reply in history:
        kind, named = _REPLY_KINDS[reply]
        if kind == "malformed":
            continue
        mood = min(MAX_MOOD, max(0, mood + MOOD_CHANGE.get(kind, 0)))
        if kind in ("hint", "liked_ask", "liked_tell") and named not in liked:
            liked.append(named)
        if move.text not in said:
            said.append(move.text)
        if move.kind in ("ask", "tell") and kind not in ("repeat", "revisit"):
            topic_turns = topic_turns + 1 if move.topic == topic else 1
            topic, going_well = move.topic, kind.startswith("liked_")
            if topic not in discussed:
                discussed.append(topic)
        else:
            topic, topic_turns, going_well = "", 0, False
    return Knowledge(mood, len(history), tuple(liked), tuple(said), tuple(discussed), topic, topic_turns,
                     going_well)


def reference_action(opening: str, history: list[tuple[Move, str]]) -> str:
    """The reference agent's next utterance (see the module docstring); it reads only the transcript."""
    k = read_transcript(opening, history)

    def unsaid(text: str) -> bool:
        return text not in k.said

    left = MAX_TURNS - k.turn
    if k.turn == 0 and k.mood < MAX_MOOD:
        return COMPLIMENT  # warm the user up: every later reply is worded more warmly
    if k.going_well and k.topic_turns == 1:  # keep a liked topic going: talk about it, then ask (or vice versa)
        other = ask_text(k.topic) if unsaid(ask_text(k.topic)) else tell_text(k.topic)
        if unsaid(other):
            return other
    fresh = [t for t in k.liked if t not in k.discussed]
    if fresh:  # talk first, so that the mood the reply lifts warms the question (on a last turn, just ask)
        return tell_text(fresh[0]) if left >= 2 else ask_text(fresh[0])
    questions = [q for q in OPEN_QUESTIONS if unsaid(q)]
    if questions and left >= 2:
        return questions[0]
    if k.mood == MAX_MOOD or not (questions or unsaid(COMPLIMENT)):
        return BYE
    return COMPLIMENT if unsaid(COMPLIMENT) else questions[0]


def optimal_policy() -> Policy:
    """The reference agent (reads the moves and replies the env has shown, not the hidden interests)."""

    def act(transcripts: list[Transcript]) -> list[str]:
        return [reference_action(t.env.opening, t.env.history) for t in transcripts]

    return act


# ------------------------------------------------------------------------------------------ behaviour styles


def behaviour_policy(seed: int, styles: Mapping[str, float] = STYLE_WEIGHTS) -> Policy:
    """An agent of a style drawn per episode with weights ``styles`` (names: the keys of ``STYLE_WEIGHTS``; see
    the module docstring), every random choice drawn from ``seed``. ``{name: 1.0}`` plays one style alone.

    A style and its per-episode choice (the repetitive agent's utterance, the fixated agent's topic) are drawn
    when an episode's first action is due (``env.turn == 0``) and kept, by rollout slot, until that episode ends;
    the rollout asks for actions in slot order, so the draws are reproducible.
    """
    unknown = sorted(set(styles) - set(STYLE_WEIGHTS))
    if unknown or not styles:
        raise ValueError(f"behaviour_policy: styles must be among {sorted(STYLE_WEIGHTS)}, got {sorted(styles)}")
    names = list(styles)
    weights = np.array([styles[name] for name in names], dtype=np.float64)
    rng = np.random.default_rng(seed)
    agents: dict[int, tuple[str, str]] = {}  # rollout slot -> (style, its choice for the episode; "": none)

    def act(transcripts: list[Transcript]) -> list[str]:
        actions = []
        for t in transcripts:
            if t.env.turn == 0:
                style = names[rng.choice(len(names), p=weights / weights.sum())]
                choice = ""
                if style == "repetitive":
                    choice = REPEATABLE[rng.integers(len(REPEATABLE))]
                elif style == "fixated":
                    choice = TOPICS[rng.integers(len(TOPICS))]
                agents[t.index] = (style, choice)
            style, choice = agents[t.index]
            actions.append(_style_action(style, choice, t.env, rng))
        return actions

    return act


def _random_utterance(rng: np.random.Generator) -> str:
    return UTTERANCES[rng.integers(len(UTTERANCES))]


def _style_action(style: str, choice: str, env: DialogueEnv, rng: np.random.Generator) -> str:
    """The next action of an agent of ``style``; ``choice`` is its per-episode utterance or topic."""
    if style == "repetitive":
        return choice
    if style == "fixated":
        return ask_text(choice) if env.turn % 2 == 0 else tell_text(choice)
    if style == "rude":
        return RUDE if env.turn == 0 or rng.random() < RUDE_ODDS else FILLER
    if style == "attentive":
        if rng.random() < ATTENTIVE_NOISE:
            return _random_utterance(rng)
        return reference_action(env.opening, env.history)
    if rng.random() < RANDOM_MALFORMED:  # random
        return MALFORMED_EXAMPLES[rng.integers(len(MALFORMED_EXAMPLES))]
    return _random_utterance(rng)


register_task(
    TaskSpec(
        name="dialogue",
        make_env=DialogueEnv,
        behaviour=behaviour_policy,
        optimal=optimal_policy,
        data_steps=MAX_TURNS,
        eval_steps=MAX_TURNS,
        worst_return=WORST_RETURN,
    )
)
