"""LMRL-Gym's chess endgames (``endgames``; Abdulhai et al. 2023, "LMRL Gym: Benchmarks for Multi-Turn
Reinforcement Learning with Language Models"): the agent plays White from K+Q vs K or K+R vs K and must mate a
Stockfish-defended Black king.

Starts: :data:`NUM_STARTS` fixed positions, the first half K+Q vs K and the second half K+R vs K, the three pieces
placed uniformly at random from the fixed seed :data:`STARTS_SEED` and kept when the position is legal, White is to
move, Black is not in check and the game is not already over (no engine is involved, so the list is the same on
every machine). ``reset(seed)`` plays start ``seed % num_instances``.

Text:
  observation: the position as FEN after Black's reply (the first observation is the start FEN), e.g.
               ``"8/8/3k4/8/8/2K5/6Q1/8 w - - 2 2"``. The FEN is the whole state save for the repetition history,
               which only matters for the threefold-repetition draw, so a model may read it alone
               (``model.context: observation``).
  action:      White's move in standard algebraic notation as python-chess writes it (``board.san``), e.g.
               ``"Qe7+"``, ``"Kd2"``, ``"Rxa1"``. Surrounding whitespace is ignored and so is a trailing ``+`` or
               ``#`` (written or not, right or wrong: the env decides checks itself). Any other text, including
               legal moves in other notations (``"e1e2"``, ``"Ke1-e2"``, a capture without ``x``), is an illegal
               move, so every move has exactly one accepted spelling.
  terminal:    the result in words instead of a FEN: ``"checkmate"``, ``"draw: stalemate"``,
               ``"draw: insufficient material"``, ``"draw: threefold repetition"``, ``"draw: fifty-move rule"``,
               ``"illegal move"`` (and ``"loss: checkmate"``, which these material balances never produce).

Rewards (LMRL-Gym): +1 for the move that mates (the episode ends), 0 for a draw (stalemate; insufficient material,
i.e. Black captured the lone queen or rook; threefold repetition; the fifty-move rule: the episode ends), -1 for
a loss, 0 for every other move. An illegal or unparseable move is LMRL-Gym's rule, not a free retry: reward -1 and
the episode ends. Draws by repetition and the fifty-move rule end the game as soon as they occur (no claim needed),
checked after each half-move. Evaluation episodes are cut (truncated, ``done=False``, return 0) after
:data:`MAX_MOVES` White moves, well above the 16 that K+R vs K needs with best play (10 for K+Q vs K); so the worst
return is -1 and the reference policy's return is +1 on every start.

Black is Stockfish at :data:`BLACK_DEPTH` plies. One engine process serves every env (and the scripted policies)
of a Python process: started on first use, with one thread and a fixed hash, and told a new game (``ucinewgame``)
before every search, so its reply to a position depends only on the position and the moves that led there (the
repetition history), never on earlier searches or on which env asked first: the game is a deterministic function
of White's moves. A lock serialises the searches, because the online collector steps envs from a background thread
and a second command to the engine would cancel the first. The binary is ``$JAXRL_LM_STOCKFISH`` when set, else
``stockfish`` on the PATH, else ``/usr/games/stockfish`` (Debian / Ubuntu: ``apt-get install stockfish``).

Dataset (behaviour policy): each White move is uniformly random among the legal moves with probability
:data:`BEHAVIOUR_P_RANDOM`, else Stockfish's move at the weak depth :data:`BEHAVIOUR_DEPTH`; so the games mix
wins, draws by a hung piece or repetition, and games still running at the step budget. It only plays legal moves.
The reference policy (the 100 mark) is Stockfish at :data:`REFERENCE_DEPTH` for White; the 50 mark is the
dataset's mean return.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import threading
from typing import Optional, Sequence

import chess
import chess.engine
import numpy as np

from jaxrl_lm.envs.base import Policy, Transcript
from jaxrl_lm.envs.tasks import TaskSpec, register_task

NUM_STARTS = 256  # half K+Q vs K, half K+R vs K
STARTS_SEED = 20231206  # fixed: the start list is part of the task's definition
MAX_MOVES = 40  # White moves before an episode is truncated (data and evaluation)

# Engine depths, in plies. Searches are depth-limited (not time-limited) so that results do not depend on the
# machine's speed or load. Costs: Stockfish 15.1, one thread, a 2-core machine busy with other jobs.
BLACK_DEPTH = 6  # the defender, searched at every env step (data, evaluation, online): about 3 ms a move,
#                  where depth 8 costs 13 ms
REFERENCE_DEPTH = 14  # mates from all 256 starts, in 8.1 moves on average and at most 15 (K+Q) / 18 (K+R);
#                       without tablebases shallower searches wander in K+R vs K (at depth 10, 3 of 32 sampled
#                       games were still running after 40 moves). 50 to 150 ms a move
BEHAVIOUR_DEPTH = 7  # weak: with the random moves below, the data wins 63% of K+Q vs K and 18% of K+R vs K games
#                      (depth 1 almost never mates: it shuffles into repetitions); about 10 ms a move
BEHAVIOUR_P_RANDOM = 0.3  # share of uniformly random legal moves in the dataset's games (most hang the piece)
ENGINE_OPTIONS = {"Threads": 1, "Hash": 16}  # one thread: searches are reproducible; Hash in MiB, fixed

STOCKFISH_ENV = "JAXRL_LM_STOCKFISH"  # environment variable naming the Stockfish binary
DEFAULT_STOCKFISH = "/usr/games/stockfish"  # where Debian's stockfish package puts it (not on root's PATH)

WIN_REWARD, DRAW_REWARD, LOSS_REWARD, ILLEGAL_REWARD, MOVE_REWARD = 1.0, 0.0, -1.0, -1.0, 0.0
ILLEGAL = "illegal move"


# ------------------------------------------------------------------------------------------------ starts


def _random_start(rng: np.random.Generator, piece: chess.PieceType) -> chess.Board:
    """A legal position with White's king and ``piece`` against Black's king, White to move, not yet over."""
    while True:
        white_king, white_piece, black_king = (int(s) for s in rng.choice(64, size=3, replace=False))
        board = chess.Board(None)
        board.set_piece_at(white_king, chess.Piece(chess.KING, chess.WHITE))
        board.set_piece_at(white_piece, chess.Piece(piece, chess.WHITE))
        board.set_piece_at(black_king, chess.Piece(chess.KING, chess.BLACK))
        board.turn = chess.WHITE
        # is_valid: kings apart and the side not to move (Black) not in check.
        if board.is_valid() and board.outcome() is None:
            return board


def make_starts(count: int = NUM_STARTS, seed: int = STARTS_SEED) -> list[str]:
    """``count`` distinct start FENs: the first half K+Q vs K, the rest K+R vs K, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    starts: list[str] = []
    for k in range(count):
        piece = chess.QUEEN if k < count // 2 else chess.ROOK
        fen = _random_start(rng, piece).fen()
        while fen in starts:
            fen = _random_start(rng, piece).fen()
        starts.append(fen)
    return starts


@functools.lru_cache(maxsize=1)
def default_starts() -> tuple[str, ...]:
    """The task's start list, built once per process on first use (registering the task builds nothing)."""
    return tuple(make_starts())


# ------------------------------------------------------------------------------------------------ engine

_ENGINE: Optional[chess.engine.SimpleEngine] = None
_ENGINE_PID = -1  # the process that started _ENGINE: a forked child must start its own
_ENGINE_LOCK = threading.Lock()


def stockfish_path() -> str:
    """The Stockfish binary: ``$JAXRL_LM_STOCKFISH``, else ``stockfish`` on the PATH, else Debian's path."""
    configured = os.environ.get(STOCKFISH_ENV)
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise FileNotFoundError(
                f"{STOCKFISH_ENV}={configured!r} is not an executable file; point it at a Stockfish binary or unset "
                f"it to use the stockfish package (apt-get install stockfish)")
        return configured
    found = shutil.which("stockfish")
    if found:
        return found
    if os.path.isfile(DEFAULT_STOCKFISH) and os.access(DEFAULT_STOCKFISH, os.X_OK):
        return DEFAULT_STOCKFISH
    raise FileNotFoundError(
        f"the endgames task needs the Stockfish chess engine, found neither on the PATH nor at {DEFAULT_STOCKFISH}: "
        f"install it (apt-get install stockfish) or set {STOCKFISH_ENV} to the binary's path")


def _start_engine(path: str) -> chess.engine.SimpleEngine:
    """Start Stockfish from a daemon thread, so that python-chess's event-loop thread, which inherits daemon-ness
    from the thread that creates it, is a daemon too.

    A non-daemon loop thread would hang the interpreter at exit: Python joins non-daemon threads *before* it runs
    ``atexit`` hooks, so :func:`close_engine` would never get to stop it.
    """
    box: dict[str, object] = {}

    def start() -> None:
        try:
            engine = chess.engine.SimpleEngine.popen_uci(path)
            engine.configure(ENGINE_OPTIONS)
            box["engine"] = engine
        except Exception as e:  # handed to the caller's thread below
            box["error"] = e

    starter = threading.Thread(target=start, name="stockfish-start", daemon=True)
    starter.start()
    starter.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["engine"]  # type: ignore[return-value]


def engine_move(board: chess.Board, depth: int) -> chess.Move:
    """Stockfish's move in ``board`` (its moves so far included, for repetitions) at ``depth`` plies.

    A new ``game`` object makes python-chess send ``ucinewgame`` first, clearing the hash and history tables, so
    the answer does not depend on earlier searches.
    """
    global _ENGINE, _ENGINE_PID
    with _ENGINE_LOCK:
        if _ENGINE is None or _ENGINE_PID != os.getpid():
            _ENGINE = _start_engine(stockfish_path())
            _ENGINE_PID = os.getpid()
        result = _ENGINE.play(board, chess.engine.Limit(depth=depth), game=object())
    if result.move is None:
        raise RuntimeError(f"Stockfish returned no move in {board.fen()} (it is only asked in unfinished games)")
    return result.move


def close_engine() -> None:
    """Stop the shared engine (the next search starts a new one); registered to run at exit."""
    global _ENGINE
    with _ENGINE_LOCK:
        engine, _ENGINE = _ENGINE, None
        if engine is None or _ENGINE_PID != os.getpid():
            return  # nothing started here (a forked child's copy belongs to its parent)
        try:
            engine.quit()
        except (chess.engine.EngineError, TimeoutError):
            pass  # already dead or hung: close() below kills it
        finally:
            engine.close()


atexit.register(close_engine)


# ------------------------------------------------------------------------------------------------ env


def game_result(board: chess.Board) -> Optional[tuple[str, float]]:
    """(observation text, reward) if the game is over in ``board``, else None.

    Repetition and the fifty-move rule end the game at once (they need no claim), the position's third occurrence
    and the 100th half-move without capture respectively.
    """
    if board.is_checkmate():
        return ("checkmate", WIN_REWARD) if board.turn == chess.BLACK else ("loss: checkmate", LOSS_REWARD)
    if board.is_stalemate():
        return "draw: stalemate", DRAW_REWARD
    if board.is_insufficient_material():
        return "draw: insufficient material", DRAW_REWARD
    if board.is_repetition(3):
        return "draw: threefold repetition", DRAW_REWARD
    if board.halfmove_clock >= 100:
        return "draw: fifty-move rule", DRAW_REWARD
    return None


def san_moves(board: chess.Board) -> dict[str, chess.Move]:
    """White's legal moves by their SAN without the check / mate suffix (the accepted action texts)."""
    return {board.san(move).rstrip("+#"): move for move in board.legal_moves}


class EndgamesEnv:
    """One endgame as White against Stockfish; seed ``i`` plays start ``i % num_instances``.

    ``starts`` replaces the task's start list (FENs with White to move), e.g. to set up a position in a test.
    """

    def __init__(self, starts: Optional[Sequence[str]] = None, black_depth: int = BLACK_DEPTH):
        self.starts = list(starts) if starts is not None else default_starts()
        self.num_instances = len(self.starts)
        self.black_depth = black_depth
        self.board = chess.Board()
        self.done = True

    def reset(self, seed: int) -> str:
        self.board = chess.Board(self.starts[seed % self.num_instances])
        if self.board.turn != chess.WHITE or game_result(self.board) is not None:
            raise ValueError(f"EndgamesEnv: start {self.board.fen()} must have White to move in a running game")
        self.done = False
        return self.board.fen()

    def step(self, action: str) -> tuple[str, float, bool]:
        if self.done:
            raise RuntimeError("EndgamesEnv.step called on a finished episode; call reset(seed) first")
        text = action.strip()
        if text[-1:] in ("+", "#"):
            text = text[:-1]
        move = san_moves(self.board).get(text)
        if move is None:
            self.done = True
            return ILLEGAL, ILLEGAL_REWARD, True
        self.board.push(move)
        result = game_result(self.board)
        if result is None:
            self.board.push(engine_move(self.board, self.black_depth))
            result = game_result(self.board)
        if result is not None:
            self.done = True
            return result[0], result[1], True
        return self.board.fen(), MOVE_REWARD, False

    def legal_actions(self) -> tuple[str, ...]:
        """White's legal moves in the position, in SAN as python-chess writes them (``board.san``, check and mate
        suffix included, as the dataset's moves are); empty once the game is over."""
        if self.done:
            return ()
        return tuple(self.board.san(move) for move in self.board.legal_moves)


# ------------------------------------------------------------------------------------------------ policies


def optimal_policy() -> Policy:
    """Stockfish at :data:`REFERENCE_DEPTH` for White, on the env's board (privileged, as the maze's policies)."""

    def act(transcripts: list[Transcript]) -> list[str]:
        return [t.env.board.san(engine_move(t.env.board, REFERENCE_DEPTH)) for t in transcripts]

    return act


def behaviour_policy(seed: int, p_random: float = BEHAVIOUR_P_RANDOM, depth: int = BEHAVIOUR_DEPTH) -> Policy:
    """With probability ``p_random`` a uniformly random legal move, else Stockfish's move at ``depth``."""
    rng = np.random.default_rng(seed)

    def act(transcripts: list[Transcript]) -> list[str]:
        actions = []
        for t in transcripts:
            board = t.env.board
            if rng.random() < p_random:
                moves = list(board.legal_moves)
                move = moves[rng.integers(len(moves))]
            else:
                move = engine_move(board, depth)
            actions.append(board.san(move))
        return actions

    return act


register_task(
    TaskSpec(
        name="endgames",
        make_env=EndgamesEnv,
        behaviour=behaviour_policy,
        optimal=optimal_policy,
        data_steps=MAX_MOVES,
        eval_steps=MAX_MOVES,
        worst_return=ILLEGAL_REWARD,
    )
)
