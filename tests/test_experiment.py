"""Evaluation during training, and the experiment runner behind scripts/reproduce.py (tiny runs on grid)."""

import json

import pytest

from jaxrl_lm.config import ConfigError, from_dict, load_config
from jaxrl_lm.eval import best_of_decodings
from jaxrl_lm.experiments.harness import load_experiment, run_experiment
from jaxrl_lm.experiments.run import run as train
from script_loader import load_script

TINY_GRID = dict(model__max_seq_len=64, data__seq_len=64, data__batch_size=8, data__task_episodes=200,
                 train__steps=4, train__log_every=2, train__checkpoint_every=0, eval__every=2, eval__episodes=3,
                 eval__max_new_tokens=8, eval__batch_size=8)


def test_training_evaluates_every_n_steps_and_ranks_checkpoints_by_an_eval_metric(tmp_path):
    cfg = load_config("configs/demo.yaml", train__out_dir=str(tmp_path), eval__policies=["q"],
                      train__keep_best_metric="eval/q/normalized_score", train__keep_best_mode="max",
                      **{**TINY_GRID, "train__checkpoint_every": 3})
    final = train(cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    # every 2 steps, at the last step, and at the checkpoint of step 3 (ranked by an eval metric), each greedily
    # and sampled (eval.decodings) side by side
    assert [(r["step"], r["policy"]["kind"], r["decoding"], r["policy"]["temperature"]) for r in records] == [
        (s, "q", d, t) for s in (2, 3, 4) for d, t in (("greedy", 0.0), ("sampled", 1.0))]
    assert all(r["task"] == "grid" and r["episodes"] == 3 and "normalized_score" in r for r in records)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/q/greedy/normalized_score" in m and "eval/q/sampled/normalized_score" in m for m in logged)
    greedy, sampled = records[-2:]
    assert final["eval/q/greedy/mean_return"] == greedy["mean_return"]
    assert final["eval/q/sampled/mean_return"] == sampled["mean_return"]
    # the unqualified metric (what keep-best ranks, and what "beats BC" compares) is the better decoding's
    better = max((greedy, sampled), key=lambda r: (r["normalized_score"], r["decoding"] == "greedy"))
    assert final["eval/q/normalized_score"] == better["normalized_score"]
    assert final["eval/q/best_is_greedy"] == float(better is greedy)


def test_best_of_decodings_picks_each_policys_better_decoding_by_the_mean():
    metrics = {"eval/bc/greedy/normalized_score": 70.0, "eval/bc/greedy/mean_return": -3.0,
               "eval/bc/sampled/normalized_score": 55.0, "eval/bc/sampled/mean_return": -5.0,
               "eval/ilql/greedy/mean_return": -4.0, "eval/ilql/sampled/mean_return": -2.0, "loss": 1.0}
    out = best_of_decodings(metrics)
    assert out["eval/bc/normalized_score"] == 70.0 and out["eval/bc/mean_return"] == -3.0
    assert out["eval/bc/best_is_greedy"] == 1.0
    assert out["eval/ilql/mean_return"] == -2.0 and out["eval/ilql/best_is_greedy"] == 0.0  # no score: the return
    assert {k: out[k] for k in metrics} == metrics  # the per-decoding metrics are kept as they were
    tie = best_of_decodings({"eval/q/greedy/normalized_score": 5.0, "eval/q/sampled/normalized_score": 5.0})
    assert tie["eval/q/best_is_greedy"] == 1.0


def test_a_config_saved_before_eval_decodings_keeps_its_one_decoding():
    saved = load_config("configs/demo.yaml").to_dict()
    for temperature, decodings in ((0.0, ("greedy",)), (0.7, ("sampled",))):
        old = {**saved, "eval": {k: v for k, v in saved["eval"].items() if k != "decodings"}}
        old["eval"]["temperature"] = temperature
        e = from_dict(old).eval
        assert e.decodings == decodings and e.temperature == (temperature or 1.0)


def test_eval_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="eval.task"):
        load_config("configs/demo.yaml", data__path="episodes.jsonl", eval__every=10)
    with pytest.raises(ConfigError, match="eval.policies"):
        load_config("configs/demo.yaml", eval__policies=["greedy"])
    with pytest.raises(ConfigError, match="eval.decodings"):
        load_config("configs/demo.yaml", eval__decodings=["beam"])
    with pytest.raises(ConfigError, match="eval.decodings"):
        load_config("configs/demo.yaml", eval__decodings=[])
    with pytest.raises(ConfigError, match=r"eval.temperature .* eval.decodings: \[greedy\]"):
        load_config("configs/demo.yaml", eval__temperature=0.0)
    assert load_config("configs/demo.yaml", eval__temperature=0.0, eval__decodings=["greedy"]).eval.decodings == \
        ("greedy",)
    with pytest.raises(ConfigError, match="keep_best_metric"):
        train(load_config("configs/demo.yaml", train__keep_best_metric="eval/bc/normalized_score",
                          train__out_dir=str(tmp_path)), progress=False)


@pytest.mark.slow
def test_experiment_runs_every_method_and_seed_and_writes_table_and_plot(tmp_path):
    spec = tmp_path / "grid.yaml"
    spec.write_text(
        "config: " + str(load_config.__globals__["REPO_ROOT"] / "configs/demo.yaml") + "\n"
        "seeds: [0, 1]\n"
        "methods:\n"
        "  bc: {policy: bc, overrides: {token_q.lambda_q: 0, token_q.lambda_v: 0, token_q.cql_alpha: 0}}\n"
        "  mc: {policy: ilql, overrides: {token_q.backup: mc}}\n")
    exp = load_experiment(spec, {k.replace("__", "."): v for k, v in TINY_GRID.items()})
    results = run_experiment(exp, tmp_path / "out", progress=False)
    assert set(results["methods"]) == {"bc", "mc"}
    for m in results["methods"].values():
        assert set(m["final"]) == set(m["curves"]) == {"greedy", "sampled"}
        for d in ("greedy", "sampled"):
            assert set(m["final"][d]) == {0, 1} and [s for s, _ in m["curves"][d][0]] == [2, 4]
            assert m["min"][d] <= m["mean"][d] <= m["max"][d]
        assert m["best_decoding"] == max(m["mean"], key=lambda d: (m["mean"][d], d == "greedy"))
    table = (tmp_path / "out" / "results.md").read_text()
    bc = results["methods"]["bc"]
    best_bc = max(bc["mean"].values())
    assert table.count("\n") == 6 and "| bc | bc | greedy |" in table and "| bc | bc | sampled |" in table
    assert "seed 1" in table and f"vs best BC (bc {bc['best_decoding']}, {best_bc:.1f})" in table
    mc = results["methods"]["mc"]
    assert f"| mc | ilql | greedy | {mc['mean']['greedy']:.1f} |" in table
    assert f"{mc['mean']['sampled'] - best_bc:+.1f} |" in table
    assert (tmp_path / "out" / "learning_curves.png").stat().st_size > 1000
    assert len(results["methods"]["mc"]["history"]["loss"][-1]) == 2  # [T, seeds] training metrics
    again = run_experiment(exp, tmp_path / "out", progress=False)  # finished runs are reused, not retrained
    assert again["methods"]["bc"]["final"] == results["methods"]["bc"]["final"]
    with pytest.raises(ConfigError, match="unknown methods"):
        run_experiment(exp, tmp_path / "out", methods=["nope"])
    # Choosing a method that starts from another brings its source along (here reused from the run above).
    spec.write_text(spec.read_text() + "  ft: {policy: ilql, init_from: mc, overrides: {token_q.backup: mc}}\n")
    exp = load_experiment(spec, {k.replace("__", "."): v for k, v in TINY_GRID.items()})
    tuned = run_experiment(exp, tmp_path / "out", methods=["ft"], progress=False)
    assert list(tuned["methods"]) == ["mc", "ft"] and tuned["methods"]["mc"]["final"] == results["methods"]["mc"]["final"]
    # scripts/evaluate.py on a run of two seeds trained together: one row per seed, or the one --train-seed picks.
    evaluate = load_script("evaluate").main
    common = ["--task", "grid", "--policy", "ilql", "--temperature", "0", "--episodes", "6"]
    assert evaluate([str(tmp_path / "out" / "mc"), *common, "--out", str(tmp_path / "ev")]) == 0
    both = json.loads(next((tmp_path / "ev").glob("*.json")).read_text())
    assert [r["train_seed"] for r in both] == [0, 1]
    assert evaluate([str(tmp_path / "out" / "mc"), *common, "--train-seed", "1", "--out", str(tmp_path / "ev1")]) == 0
    one = json.loads(next((tmp_path / "ev1").glob("*.json")).read_text())
    assert len(one) == 1 and one[0]["mean_return"] == both[1]["mean_return"]
    # Left to the run's eval settings (kind, beta, decodings): greedy and sampled rows, side by side, per seed.
    assert evaluate([str(tmp_path / "out" / "mc"), "--task", "grid", "--episodes", "6", "--out",
                     str(tmp_path / "ev2")]) == 0
    rows = json.loads(next((tmp_path / "ev2").glob("*.json")).read_text())
    assert [(r["train_seed"], r["decoding"], r["policy"]["temperature"], r["policy"]["kind"], r["policy"]["beta"])
            for r in rows] == [(s, d, t, "ilql", 4.0) for s in (0, 1) for d, t in (("greedy", 0.0), ("sampled", 1.0))]
    assert rows[0]["mean_return"] == both[0]["mean_return"]  # the greedy row is the --temperature 0 evaluation
    table = next((tmp_path / "ev2").glob("*.md")).read_text()
    assert "ilql beta=4 greedy" in table and "ilql beta=4 T=1" in table


def test_experiment_include_replaces_keys_and_resolves_config_where_named(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "base.yaml").write_text("config: tasks/a.yaml\nseeds: [0, 1]\nmethods:\n  bc: {policy: bc}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other.yaml").write_text("include: ../base.yaml\nconfig: ../tasks/b.yaml\nseeds: [3]\n")
    exp = load_experiment(tmp_path / "sub" / "other.yaml")
    assert exp.name == "other" and exp.seeds == (3,) and [m.name for m in exp.methods] == ["bc"]
    assert exp.config == (tmp_path / "tasks" / "b.yaml").resolve()
    assert load_experiment(tmp_path / "base.yaml").config == (tmp_path / "tasks" / "a.yaml").resolve()
    (tmp_path / "loop.yaml").write_text("include: loop.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_experiment(tmp_path / "loop.yaml")
    (tmp_path / "nomethods.yaml").write_text("config: tasks/a.yaml\n")
    with pytest.raises(ConfigError, match="methods"):
        load_experiment(tmp_path / "nomethods.yaml")
    (tmp_path / "missing.yaml").write_text("include: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match="included by"):
        load_experiment(tmp_path / "missing.yaml")


def test_shipped_experiments_load():
    root = load_config.__globals__["REPO_ROOT"] / "configs" / "reproduce"
    for path in sorted(root.glob("*.yaml")):
        exp = load_experiment(path)
        assert exp.config.exists(), path
        load_config(exp.config)


def test_reproduce_script_takes_overrides_after_options():
    args = load_script("reproduce").parse_args(["grid", "--seeds", "1", "2", "--out", "o", "train.steps=5",
                                                "--fresh", "eval.every=5"])
    assert args.experiment == "grid" and args.seeds == [1, 2] and args.fresh
    assert args.overrides == ["train.steps=5", "eval.every=5"]
