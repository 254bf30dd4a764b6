"""LMRL-Gym chess endgames (jaxrl_lm/envs/chess_endgames.py) against the real Stockfish binary: moves, Black's
replies, terminal rewards, truncation, determinism, the reference and behaviour policies, the missing-binary error."""

import threading

import chess
import chess.engine
import pytest

from jaxrl_lm import envs
from jaxrl_lm.envs import chess_endgames as ce

START = "5Q2/8/8/6k1/8/8/6K1/8 w - - 0 1"  # the first start, K+Q vs K: Qf8, Kg2 against Kg5
MATE_OR_STALEMATE = "k7/8/1K6/2Q5/8/8/8/8 w - - 0 1"  # Qc8# or Qf8# mate, Qc7 stalemates
HANGING_ROOK = "8/8/8/4k3/7R/8/8/K7 w - - 0 1"  # Re4+?? and Black takes the rook
CENTRAL_KING = "8/8/8/4k3/8/8/8/R3K3 w - - 0 1"  # K+R vs K, no mate within two moves


def engine_reply(board: chess.Board) -> chess.Move:
    """Black's move from a Stockfish process of the test's own, with the env's settings (an independent check)."""
    engine = chess.engine.SimpleEngine.popen_uci(ce.stockfish_path())
    try:
        engine.configure(ce.ENGINE_OPTIONS)
        return engine.play(board, chess.engine.Limit(depth=ce.BLACK_DEPTH), game=object()).move
    finally:
        engine.quit()


def test_starts_are_fixed_legal_and_half_queen_half_rook():
    starts = ce.default_starts()
    assert len(starts) == ce.NUM_STARTS == envs.get_task("endgames").num_instances == len(set(starts))
    assert list(starts) == ce.make_starts(), "the start list is a fixed function of its seed"
    assert (starts[0], starts[len(starts) // 2]) == (START, "8/1R6/5k2/8/8/8/8/3K4 w - - 0 1"), "and stays fixed"
    for k, fen in enumerate(starts):
        board = chess.Board(fen)
        piece = chess.QUEEN if k < len(starts) // 2 else chess.ROOK
        assert board.turn == chess.WHITE and board.is_valid() and board.outcome() is None, fen
        assert sorted(p.piece_type for p in board.piece_map().values()) == sorted([chess.KING, chess.KING, piece])
        assert len(board.pieces(piece, chess.WHITE)) == 1 and len(board.pieces(chess.KING, chess.BLACK)) == 1
    env = ce.EndgamesEnv()
    assert env.reset(0) == START and env.reset(3 + ce.NUM_STARTS) == starts[3]


def test_legal_move_returns_the_position_after_blacks_engine_reply():
    board = chess.Board(START)
    board.push_san("Qd8+")  # check along the d8-g5 diagonal: Black must answer it
    board.push(engine_reply(board))
    for action in ("Qd8", "Qd8+", "  Qd8+ \n", "Qd8#"):  # the suffix is optional (and not checked)
        env = ce.EndgamesEnv()
        assert env.reset(0) == START
        assert env.step(action) == (board.fen(), 0.0, False), action
    assert len(env.board.move_stack) == 2, "the env keeps the game's moves (repetitions are told from them)"


def test_illegal_and_unparseable_moves_end_the_game_at_minus_one():
    env = ce.EndgamesEnv()
    for action in ("Qa1", "Kg4", "kf2", "g2f2", "Kg2-f2", "Kg2f2", "--", "O-O", "", "Qd8++", "xyzzy", "é\u0000☃"):
        env.reset(0)
        assert env.step(action) == ("illegal move", -1.0, True), action
        with pytest.raises(RuntimeError, match="reset"):
            env.step("Kf2")
    with pytest.raises(RuntimeError, match="reset"):
        ce.EndgamesEnv().step("Kf2")  # never reset


def test_mate_stalemate_and_a_captured_piece_end_the_game():
    env = ce.EndgamesEnv(starts=[MATE_OR_STALEMATE, HANGING_ROOK])
    for action in ("Qc8#", "Qf8"):
        env.reset(0)
        assert env.step(action) == ("checkmate", 1.0, True)
    env.reset(0)
    assert env.step("Qc7") == ("draw: stalemate", 0.0, True)
    env.reset(1)
    assert env.step("Re4+") == ("draw: insufficient material", 0.0, True)
    assert env.board.peek() == chess.Move.from_uci("e5e4") and not env.board.pieces(chess.ROOK, chess.WHITE)


def test_repetition_is_a_draw():
    env = ce.EndgamesEnv(starts=[CENTRAL_KING])
    env.reset(0)
    result = None
    for _ in range(6):  # the rook shuttles a1-a2; Black's replies are its own, so repetition needs a few cycles
        for action in ("Ra2", "Ra1"):
            observation, reward, done = env.step(action)
            if done:
                result = (observation, reward)
                break
        if result:
            break
    assert result == ("draw: threefold repetition", 0.0), result
    assert env.board.is_repetition(3)


def test_step_budget_truncates_through_rollout():
    env = ce.EndgamesEnv(starts=[CENTRAL_KING])
    (episode,) = envs.rollout([env], ce.optimal_policy(), [0], max_steps=2, task="endgames")
    assert not episode["done"] and episode["meta"]["return"] == 0.0 and len(episode["turns"]) == 5
    assert chess.Board(episode["turns"][-1]["text"]).fen() == env.board.fen()


def test_games_are_deterministic_across_engines_and_threads():
    seeds = [0, 1, ce.NUM_STARTS // 2, ce.NUM_STARTS // 2 + 1]
    first = envs.rollout([ce.EndgamesEnv() for _ in seeds], ce.behaviour_policy(7), seeds, 12, "endgames")
    ce.close_engine()  # a new engine process, and searches interleaved in another order below
    for episode in first:
        env = ce.EndgamesEnv()
        assert env.reset(episode["meta"]["seed"]) == episode["turns"][0]["text"]
        for k in range(1, len(episode["turns"]), 2):
            action, observation = episode["turns"][k], episode["turns"][k + 1]
            assert env.step(action["text"]) == (observation["text"], action["reward"], env.done)
    # Two threads stepping their own envs through the shared engine (as the online collector does) play the
    # same games as one thread.
    results: dict[int, list] = {}

    def play(seed: int) -> None:
        results[seed] = envs.rollout([ce.EndgamesEnv()], ce.optimal_policy(), [seed], 20, "endgames")

    threads = [threading.Thread(target=play, args=(seed,)) for seed in seeds[1::2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed in seeds[1::2]:
        assert results[seed] == envs.rollout([ce.EndgamesEnv()], ce.optimal_policy(), [seed], 20, "endgames")


def test_reference_policy_mates_from_every_start_of_a_subset():
    half = ce.NUM_STARTS // 2
    seeds = [0, 1, 2, half, half + 1, half + 2]
    episodes = envs.rollout([ce.EndgamesEnv() for _ in seeds], ce.optimal_policy(), seeds, ce.MAX_MOVES, "endgames")
    for episode in episodes:
        assert episode["done"] and episode["meta"]["return"] == 1.0, episode["meta"]
        assert episode["turns"][-1]["text"] == "checkmate"


def test_behaviour_dataset_is_reproducible_and_between_reference_and_worst(monkeypatch):
    spec = envs.get_task("endgames")
    # make_dataset's stats read the reference's mean return over all 256 starts (about a minute of Stockfish);
    # it is +1 (every start mated, measured; the subset above checks the policy), so the test plants it.
    monkeypatch.setitem(spec.__dict__, "optimal_return", 1.0)
    episodes, stats = envs.make_dataset("endgames", episodes=24, seed=0)
    again, _ = envs.make_dataset("endgames", episodes=24, seed=0)
    assert episodes == again
    returns = [e["meta"]["return"] for e in episodes]
    assert -1.0 < stats["dataset"]["mean_return"] < 1.0 and stats["normalisation"]["worst"] == -1.0
    assert {1.0, 0.0} <= set(returns), "the data holds wins and draws (or cut games)"
    for episode in episodes:  # replay: legal canonical SAN, Black's replies legal, the texts the rules say
        turns = episode["turns"]
        board = chess.Board(turns[0]["text"])
        assert board.fen() in ce.default_starts()
        for k in range(1, len(turns), 2):
            action, observation = turns[k]["text"], turns[k + 1]["text"]
            assert action == board.san(board.parse_san(action)), "the data's moves are canonical SAN"
            board.push_san(action)
            if episode["done"] and k + 2 == len(turns):
                assert (observation == "checkmate") == (turns[k]["reward"] == 1.0) and turns[k]["reward"] >= 0
            else:
                board.push(black_move(board, observation))
        assert episode["done"] or len(turns) // 2 == ce.MAX_MOVES


def black_move(board: chess.Board, fen: str) -> chess.Move:
    """Black's legal move that leads from ``board`` to the position ``fen``."""
    moves = []
    for move in board.legal_moves:
        board.push(move)
        if board.fen() == fen:
            moves.append(move)
        board.pop()
    assert len(moves) == 1, (board.fen(), fen)
    return moves[0]


def test_missing_binary_raises_a_clear_error(monkeypatch, tmp_path):
    env = ce.EndgamesEnv()
    monkeypatch.setenv(ce.STOCKFISH_ENV, str(tmp_path / "no-stockfish"))
    ce.close_engine()
    env.reset(0)
    with pytest.raises(FileNotFoundError, match=f"{ce.STOCKFISH_ENV}=.*apt-get install stockfish"):
        env.step("Kf2")
    monkeypatch.delenv(ce.STOCKFISH_ENV)
    monkeypatch.setattr(ce.shutil, "which", lambda name: None)
    monkeypatch.setattr(ce, "DEFAULT_STOCKFISH", str(tmp_path / "no-stockfish"))
    env.reset(0)
    with pytest.raises(FileNotFoundError, match=f"apt-get install stockfish.*{ce.STOCKFISH_ENV}"):
        env.step("Kf2")
