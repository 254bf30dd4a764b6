"""Speed and memory of the update (and the data loader): one JSON line per configuration.

    python scripts/benchmark.py                      # every preset below
    python scripts/benchmark.py --only gpt2_small    # presets whose name starts with this
    python scripts/benchmark.py --only gpt2_small_heads_k2,gpt2_small_frozen   # several prefixes

Each preset runs in its own subprocess, so ``peak_rss_gb`` is that configuration's own peak. Fields:
compile_s (lower + compile), step_s (median over timed steps after warm-up), tokens_per_s (batch tokens /
step_s), model_flops_per_token (jaxrl_lm.train.flops: trunk, every head, the target forward), mfu (achieved
model FLOP/s over the float32 matmul peak measured in the same process), matmul_peak_gflops, compiled memory
analysis (arguments, outputs, temporaries, in GB) and the process's peak RSS.

The ``loader`` line times the data pipeline on the demo config (grid-stitching episodes, packed rows, byte
tokenizer): ``tokens_per_s`` counts delivered positions, ``real_tokens_per_s`` non-padding ones.

The ``online_overhead`` line runs the training loop on the demo config's batch shape twice in one process, offline
and online (a trivial environment, 16 episodes of 4 steps per round every 16 updates, collection overlapped):
updates per second of each, timed over the same steps after warm-up, and their ratio.

The ``decode_gpt2_small`` line times jitted KV-cache decoding (``jaxrl_lm.generate.decode_throughput``) for the
bc and ilql policies: new tokens per second over the whole batch, prefill included.

The ``mesh_bytes_gpt2_small`` line gives the TrainState bytes one device holds (params, targets, optimizer
state) on 8 devices for the meshes (data, fsdp, tensor) in ``MESHES``, from the shardings of the abstract state.
Every update line also reports its own mesh and per-device state bytes.

The batch is dialogue-shaped: each row alternates observation and agent turns of ``--turn-len`` tokens, so
``--action-fraction`` of the tokens are agent tokens; ``rl.decision_fraction`` is set to just cover them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

LOADER_PRESET = "loader"
ONLINE_PRESET = "online_overhead"
DECODE_PRESET = "decode_gpt2_small"
MESH_PRESET = "mesh_bytes_gpt2_small"
MESHES = ((8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4))
PRESETS: dict[str, dict] = {
    # name: config file, overrides, batch, seq_len
    LOADER_PRESET: dict(config="configs/demo.yaml", overrides=[], batch=16, seq_len=128),
    "tiny": dict(config="configs/models/tiny.yaml", overrides=[], batch=8, seq_len=128),
    "gpt2_small_heads_k2": dict(config="configs/models/gpt2_small.yaml", overrides=[], batch=4, seq_len=256),
    "gpt2_small_heads_k1": dict(config="configs/models/gpt2_small.yaml", overrides=["model.n_q_heads=1"],
                                batch=4, seq_len=256),
    "gpt2_small_full_k2": dict(config="configs/models/gpt2_small.yaml", overrides=["token_q.target_scope=full"],
                               batch=4, seq_len=256),
    # A frozen trunk bottom (train.frozen_layers): the embeddings and 10 of 12 blocks, or the whole trunk
    "gpt2_small_frozen10_k2": dict(config="configs/models/gpt2_small.yaml", overrides=["train.frozen_layers=10"],
                                   batch=4, seq_len=256),
    "gpt2_small_frozen_all_k2": dict(config="configs/models/gpt2_small.yaml", overrides=["train.frozen_layers=-1"],
                                     batch=4, seq_len=256),
    # ... and read from the feature cache (data.feature_cache): the batch brings the frozen blocks' output
    "gpt2_small_cached10_k2": dict(config="configs/models/gpt2_small.yaml", overrides=["train.frozen_layers=10"],
                                   batch=4, seq_len=256, features=True),
    "gpt2_small_cached_all_k2": dict(config="configs/models/gpt2_small.yaml", overrides=["train.frozen_layers=-1"],
                                     batch=4, seq_len=256, features=True),
    # The utterance-level critic on the tiny preset's batch (4 agent turns of 16 tokens per row): the max backup
    # samples N = 4 turns of up to 16 tokens at each state and scores them beside the row; expectile samples none.
    "tiny_utterance_max": dict(config="configs/models/tiny.yaml", overrides=[
        "rl.objective=utterance_q", "utterance_q.backup=max", "utterance_q.candidates=4",
        "utterance_q.candidate_tokens=16", "utterance_q.max_turns=5"], batch=8, seq_len=128),
    "tiny_utterance_expectile": dict(config="configs/models/tiny.yaml", overrides=[
        "rl.objective=utterance_q", "utterance_q.backup=expectile", "utterance_q.cql_alpha=0",
        "utterance_q.max_turns=5"], batch=8, seq_len=128),
    # The training loop's updates per second online (a trivial environment, collection overlapped with the
    # updates) against offline, on the demo config's batch shape (tiny model, 16 x 128)
    ONLINE_PRESET: dict(config="configs/demo.yaml", overrides=[], batch=16, seq_len=128),
    # batch 8, a 64-token prompt, 128 new tokens (docs/design.md section 8 compares HF generate at batch 8)
    DECODE_PRESET: dict(config="configs/models/gpt2_small.yaml", overrides=[], batch=8, seq_len=64),
    # per-device state bytes on 8 (forced host) devices for each mesh; abstract: nothing is allocated
    MESH_PRESET: dict(config="configs/models/gpt2_small.yaml", overrides=[], batch=8, seq_len=256),
}


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best float32 matmul rate JAX reaches here, in GFLOP/s (the MFU denominator)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def dialogue_batch(batch: int, seq_len: int, vocab: int, turn_len: int, action_fraction: float, seed: int = 0):
    """Rows of alternating observation / agent turns; one episode per row, truncated (done = 0)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    act_len = max(1, round(turn_len * action_fraction / (1 - action_fraction))) if action_fraction < 1 else seq_len
    obs_len = turn_len if action_fraction < 1 else 0
    pattern, turns, t = [], [], 0
    while len(pattern) < seq_len:
        pattern += [0] * obs_len + [1] * act_len
        turns += [t] * obs_len + [t + 1] * act_len
        t += 2
    action_mask = np.tile(np.array(pattern[:seq_len], np.int32), (batch, 1))
    action_mask[:, 0] = 0
    reward = np.where(action_mask == 1, rng.normal(size=(batch, seq_len)), 0).astype(np.float32)
    return {
        "tokens": rng.integers(0, vocab, (batch, seq_len), dtype=np.int32),
        "action_mask": action_mask,
        "reward": reward,
        "done": np.zeros((batch, seq_len), np.int32),
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "turn_ids": np.tile(np.array(turns[:seq_len], np.int32), (batch, 1)),
    }


def run_loader(args: argparse.Namespace) -> dict:
    import jaxrl_lm
    from jaxrl_lm import data

    p = PRESETS[LOADER_PRESET]
    cfg = jaxrl_lm.load_config(p["config"], p["overrides"] + args.override)
    loader = data.make_loader(cfg.data, tokenizer=data.load_tokenizer(cfg.data.tokenizer))
    try:
        figures = data.loader_throughput(loader, num_batches=200)
    finally:
        loader.close()
    return {"config": LOADER_PRESET, "data": cfg.data.path, "batch": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
            **{k: round(v, 3) for k, v in figures.items()},
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)}


class TrivialEnv:
    """An environment that costs nothing: every action is answered "ok" with reward 0 (the benchmark of the online
    loop's overhead measures the collector and the replay batches, not an environment)."""

    num_instances = 1

    def reset(self, seed: int) -> str:
        return "start"

    def step(self, action: str) -> tuple[str, float, bool]:
        return "ok", 0.0, False


def say_go(transcripts: list[str]) -> list[str]:
    return ["go"] * len(transcripts)


def run_online(args: argparse.Namespace) -> dict:
    import jax

    import jaxrl_lm
    from jaxrl_lm import data, envs
    from jaxrl_lm.experiments.online import OnlineData
    from jaxrl_lm.train import loop

    envs.register_task(envs.TaskSpec(name="trivial", make_env=TrivialEnv, behaviour=lambda seed: say_go,
                                     optimal=lambda: say_go,
                                     data_steps=4, eval_steps=4, worst_return=0.0), overwrite=True)
    p = PRESETS[ONLINE_PRESET]
    steps, warm = 40 + 16 * args.steps, 24
    cfg = jaxrl_lm.load_config(p["config"], p["overrides"] + args.override + [
        f"train.steps={steps}", f"train.log_every={steps}", "train.checkpoint_every=0", "online.task=trivial",
        "online.envs=16", "online.updates_per_round=16", "online.max_steps=4", "online.max_new_tokens=8"])

    def timed(**kw) -> float:
        marks = {}

        def mark(ctx):
            if ctx.step in (warm, steps):
                jax.block_until_ready(ctx.state)
                marks[ctx.step] = time.perf_counter()
        loop.train(cfg, hooks=[*kw.pop("hooks", []), loop.Hook(mark, every=1)], progress=False, outputs=False,
                   **kw)
        return (steps - warm) / (marks[steps] - marks[warm])

    offline = timed(episodes=envs.task_dataset(cfg.data))
    online_cfg = jaxrl_lm.config.replace(cfg, online__enabled=True)
    collector = OnlineData(online_cfg, data.load_tokenizer(cfg.data.tokenizer))
    online = timed(source=collector, hooks=collector.hooks())
    return {"config": ONLINE_PRESET, "device": jax.devices()[0].device_kind, "batch": p["batch"],
            "seq_len": p["seq_len"], "timed_steps": steps - warm, "envs": 16, "updates_per_round": 16,
            "offline_updates_per_s": round(offline, 2), "online_updates_per_s": round(online, 2),
            "online_over_offline": round(online / offline, 3),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)}


def run_decode(args: argparse.Namespace) -> dict:
    import jax

    import jaxrl_lm
    from jaxrl_lm.generate import decode_throughput

    p = PRESETS[DECODE_PRESET]
    cfg = jaxrl_lm.load_config(p["config"], p["overrides"] + args.override)
    params = jaxrl_lm.train.split_model(jaxrl_lm.models.build(cfg.model))[1]
    lines = {kind: decode_throughput(cfg.model, params, batch=p["batch"], prompt_len=p["seq_len"], new_tokens=128,
                                     kind=kind) for kind in ("bc", "ilql")}
    return {"config": DECODE_PRESET, "device": jax.devices()[0].device_kind,
            **{f"{kind}_{k}": round(v, 3) for kind, line in lines.items() for k, v in line.items()
               if k in ("new_tokens_per_s", "step_ms", "compile_s")},
            "batch": p["batch"], "prompt_len": p["seq_len"], "new_tokens": 128,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)}


def run_mesh_bytes(args: argparse.Namespace) -> dict:
    import jaxrl_lm
    from jaxrl_lm.train.sharding import setup_parallelism, state_bytes_per_device

    p = PRESETS[MESH_PRESET]
    out = {"config": MESH_PRESET}
    for data, fsdp, tensor in MESHES:
        cfg = jaxrl_lm.load_config(p["config"], p["overrides"] + args.override + [
            f"data.batch_size={p['batch']}", f"data.seq_len={p['seq_len']}", f"mesh.data={data}",
            f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}", "model.vocab_pad_multiple=8"])
        per_device = state_bytes_per_device(setup_parallelism(cfg).abstract_state)
        out[f"{data}x{fsdp}x{tensor}_gb"] = {k: round(v / 1024**3, 3) for k, v in per_device.items()}
    return out


def run_preset(name: str, args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    import jaxrl_lm
    from jaxrl_lm.rl import transitions, turn_slots, turn_transitions
    from jaxrl_lm.train.flops import update_flops
    from jaxrl_lm.train.mesh import place_batch
    from jaxrl_lm.train.sharding import init_sharded_state, setup_parallelism, state_bytes_per_device
    from jaxrl_lm.models import model_graphdef

    p = PRESETS[name]
    batch_np = dialogue_batch(p["batch"], p["seq_len"], 50257 if "gpt2" in name else 256, args.turn_len,
                              args.action_fraction)
    decisions_per_row = int(np.asarray(transitions(batch_np, gamma=0.99, time_step="token").decision).sum(1).max())
    fraction = min(1.0, decisions_per_row / p["seq_len"])
    cfg = jaxrl_lm.load_config(p["config"], p["overrides"] + args.override + [
        f"data.batch_size={p['batch']}", f"data.seq_len={p['seq_len']}", f"rl.decision_fraction={fraction}"])
    peak = matmul_peak_gflops()

    if p.get("features"):  # what jaxrl_lm.train.features.FeatureBatches adds to each batch
        batch_np["features"] = np.random.default_rng(0).normal(
            size=(p["batch"], p["seq_len"], cfg.model.d_model)).astype(np.float32)
    par = setup_parallelism(cfg)  # the mesh and shardings exactly as the training loop builds them
    state = init_sharded_state(cfg, par)
    update = jaxrl_lm.train.make_update(cfg, model_graphdef(cfg.model), state_sharding=par.state_sharding,
                                        batch_sharding=par.batch_sharding)
    batch = place_batch(batch_np, par.mesh)

    t0 = time.perf_counter()
    compiled = update.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()

    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = update_flops(cfg, p["batch"], p["seq_len"], cached_features=bool(p.get("features")))
    tokens = p["batch"] * p["seq_len"]
    gb = 1024**3
    extra = {}
    if cfg.rl.objective == "utterance_q" and cfg.objective.samples:
        # Trunk tokens per row: the shared layout's L + C S N against N copies of each state's history
        # (history up to the state, then the candidate) at every candidate state of the row.
        u = cfg.objective
        slots = turn_slots(turn_transitions(batch_np, gamma=0.99), u.max_turns)
        states = np.asarray(slots.state)[np.asarray(slots.state_used)[:, :]].reshape(p["batch"], -1)
        extra = {"candidates": u.candidates, "candidate_tokens": u.candidate_tokens, "states_per_row": states.shape[1],
                 "trunk_tokens_shared": p["seq_len"] + u.candidate_tokens * u.max_turns * u.candidates,
                 "trunk_tokens_copies": int(p["seq_len"] + u.candidates * np.sum(states[0] + 1 + u.candidate_tokens))}
    return {
        "objective": cfg.rl.objective,
        **extra,
        "config": name,
        "device": jax.devices()[0].device_kind,
        "n_devices": jax.device_count(),
        "mesh": "x".join(str(v) for v in par.mesh.shape.values()),
        "dtype": cfg.model.dtype,
        "batch": p["batch"],
        "seq_len": p["seq_len"],
        "n_q_heads": cfg.model.n_q_heads,
        "target_scope": cfg.token_q.target_scope,
        "frozen_layers": cfg.train.frozen_layers,
        "cached_features": bool(p.get("features")),
        "backup": cfg.objective.backup,
        "decision_fraction": round(fraction, 4),
        "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 4),
        "tokens_per_s": round(tokens / step_s, 1),
        "model_flops_per_token": round(flops.per_token),
        "model_gflops_per_step": round(flops.total / 1e9, 2),
        "achieved_gflops": round(flops.total / step_s / 1e9, 1),
        "matmul_peak_gflops": round(peak, 1),
        "mfu": round(flops.total / step_s / (peak * 1e9), 3),
        "state_per_device_gb": round(state_bytes_per_device(state)["total"] / gb, 3),
        "mem_argument_gb": round(mem.argument_size_in_bytes / gb, 3),
        "mem_output_gb": round(mem.output_size_in_bytes / gb, 3),
        "mem_temp_gb": round(mem.temp_size_in_bytes / gb, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
        "loss": float(metrics["loss"]),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run the presets whose name starts with this (several: a,b,c)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--turn-len", type=int, default=16, help="tokens per observation turn")
    ap.add_argument("--action-fraction", type=float, default=0.5, help="fraction of tokens that are agent tokens")
    ap.add_argument("--override", action="append", default=[], help="extra config override, e.g. token_q.backup=max")
    ap.add_argument("--preset", help=argparse.SUPPRESS)  # internal: run one preset in this process
    args = ap.parse_args(argv)
    if args.preset:
        special = {LOADER_PRESET: run_loader, DECODE_PRESET: run_decode, MESH_PRESET: run_mesh_bytes,
                   ONLINE_PRESET: run_online}
        run = special.get(args.preset, lambda a: run_preset(args.preset, a))
        print(json.dumps(run(args)), flush=True)
        return
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    prefixes = tuple(args.only.split(","))
    for name in PRESETS:
        if not name.startswith(prefixes):
            continue
        env = dict(os.environ)
        if name == MESH_PRESET:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
        proc = subprocess.run([sys.executable, __file__, "--preset", name] + passthrough,
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(json.dumps({"config": name, "error": proc.stderr.strip().splitlines()[-1:]}), flush=True)
            continue
        print(proc.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
