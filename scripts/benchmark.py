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
bc policy greedy (``bc_greedy``, the like-for-like line for ``generate``) and sampled at T = 1, and ilql sampled:
new tokens per second over the whole batch, prefill included, and the prefill alone (``prefill_ms``) and one
decoding step (``token_ms``) apart.

The ``best_of_gpt2_small`` line times best-of-8 decoding (``jaxrl_lm.generate.best_of_throughput``) at the
utterance policy's shape, each episode's history prefilled once and copied to its 8 candidates, against the same
decoding with 8 prefills of each history: ``speedup`` is their ratio (same prompts, keys and samples).

Same-run baselines (docs/design.md section 8: every target is a ratio measured in one invocation):

- ``torch_gpt2_small_heads_k2`` runs ``scripts/torch_ilql_step.py``, a PyTorch eager implementation of the same
  ILQL step (a ``transformers`` GPT-2 trunk, the same heads, loss, AdamW and target EMA), at the
  ``gpt2_small_heads_k2`` shape from the same initial weights (our initial state exported by a subprocess, so that
  the timed process never imports JAX): ``tokens_per_s`` over the median step, ``mfu`` against torch's own matmul
  peak in that process, ``peak_rss_gb``, and ``first_loss`` (the initial loss, which equals ours).
- ``*_jemalloc`` presets are the same runs with ``LD_PRELOAD`` jemalloc (``JEMALLOC``), for ours and for torch.
- ``hf_generate_gpt2_small`` exports the ``decode_gpt2_small`` model (same seed) with ``jaxrl_lm.interop.export_hf``,
  loads it with ``transformers`` and times greedy ``generate`` with its KV cache at the same batch, prompt and new
  tokens (best of 5 after one warm-up call, as the ``decode_gpt2_small`` line).

When a pair ran in the same invocation, a final ``comparison`` line gives the ratios (ours over the baseline) and
whether each target of docs/design.md section 8 is met.

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
import tempfile
import time
from pathlib import Path

LOADER_PRESET = "loader"
ONLINE_PRESET = "online_overhead"
DECODE_PRESET = "decode_gpt2_small"
BEST_OF_PRESET = "best_of_gpt2_small"
MESH_PRESET = "mesh_bytes_gpt2_small"
MESHES = ((8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4))
UPDATE_PRESET = "gpt2_small_heads_k2"  # the shape of the speed and memory targets (docs/design.md section 8)
TORCH_PRESET = "torch_gpt2_small_heads_k2"
HF_GENERATE_PRESET = "hf_generate_gpt2_small"
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"  # Debian/Ubuntu libjemalloc2
PRESETS: dict[str, dict] = {
    # name: config file, overrides, batch, seq_len
    LOADER_PRESET: dict(config="configs/demo.yaml", overrides=[], batch=16, seq_len=128),
    "tiny": dict(config="configs/models/tiny.yaml", overrides=[], batch=8, seq_len=128),
    UPDATE_PRESET: dict(config="configs/models/gpt2_small.yaml", overrides=[], batch=4, seq_len=256),
    # The same step with jemalloc, and the PyTorch step (scripts/torch_ilql_step.py) with each allocator
    f"{UPDATE_PRESET}_jemalloc": dict(config="configs/models/gpt2_small.yaml", overrides=[], batch=4, seq_len=256,
                                      allocator="jemalloc"),
    TORCH_PRESET: dict(runner="torch", baseline_of=UPDATE_PRESET),
    f"{TORCH_PRESET}_jemalloc": dict(runner="torch", baseline_of=UPDATE_PRESET, allocator="jemalloc"),
    # Memory options on the same step (issue 24): the vocabulary walked in chunks of 8192 ids (model.vocab_chunk),
    # then also every block rematerialised (model.remat=full), then also AdamW's first moment in bfloat16
    "gpt2_small_mem_chunk": dict(config="configs/models/gpt2_small.yaml", overrides=["model.vocab_chunk=8192"],
                                 batch=4, seq_len=256),
    "gpt2_small_mem_chunk_remat": dict(config="configs/models/gpt2_small.yaml",
                                       overrides=["model.vocab_chunk=8192", "model.remat=full"], batch=4, seq_len=256),
    "gpt2_small_mem_lean": dict(config="configs/models/gpt2_small.yaml", overrides=[
        "model.vocab_chunk=8192", "model.remat=full", "optim.mu_dtype=bfloat16"], batch=4, seq_len=256),
    "gpt2_small_mem_lean_jemalloc": dict(config="configs/models/gpt2_small.yaml", overrides=[
        "model.vocab_chunk=8192", "model.remat=full", "optim.mu_dtype=bfloat16"], batch=4, seq_len=256,
        allocator="jemalloc"),
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
    # Best-of-8 turns for 4 episodes at the utterance policy's shape (a 384-token history, 16-token turns): one
    # prefill per episode copied to its candidates, against 8 prefills of the same history (same samples)
    BEST_OF_PRESET: dict(config="configs/models/gpt2_small.yaml", overrides=[], batch=4, seq_len=384),
    # Hugging Face generate (greedy, KV cache) on the decode preset's weights, same batch, prompt and new tokens
    HF_GENERATE_PRESET: dict(runner="hf_generate", baseline_of=DECODE_PRESET),
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
    params = jaxrl_lm.models.split_model(jaxrl_lm.models.build(cfg.model))[1]
    # bc greedy is the like-for-like line for Hugging Face's greedy generate; bc and ilql sample at T = 1.
    runs = {"bc_greedy": ("bc", 0.0), "bc": ("bc", 1.0), "ilql": ("ilql", 1.0)}
    lines = {name: decode_throughput(cfg.model, params, batch=p["batch"], prompt_len=p["seq_len"], new_tokens=128,
                                     kind=kind, temperature=temperature, repeats=5)
             for name, (kind, temperature) in runs.items()}
    return {"config": DECODE_PRESET, "device": jax.devices()[0].device_kind,
            **{f"{name}_{k}": round(v, 3) for name, line in lines.items() for k, v in line.items()
               if k in ("new_tokens_per_s", "step_ms", "prefill_ms", "token_ms", "compile_s")},
            "batch": p["batch"], "prompt_len": p["seq_len"], "new_tokens": 128,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)}


def run_best_of(args: argparse.Namespace) -> dict:
    import jax

    import jaxrl_lm
    from jaxrl_lm.generate import best_of_throughput

    p = PRESETS[BEST_OF_PRESET]
    cfg = jaxrl_lm.load_config(p["config"], p["overrides"] + args.override)
    params = jaxrl_lm.models.split_model(jaxrl_lm.models.build(cfg.model))[1]
    line = best_of_throughput(cfg.model, params, batch=p["batch"], prompt_len=p["seq_len"], new_tokens=16,
                              best_of=8, kind="utterance", repeats=3)
    return {"config": BEST_OF_PRESET, "device": jax.devices()[0].device_kind,
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in line.items()},
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


def preset_batch(name: str, args: argparse.Namespace) -> dict:
    """The dialogue-shaped numpy batch of an update preset (the same for ours and for the torch baseline)."""
    p = PRESETS[name]
    return dialogue_batch(p["batch"], p["seq_len"], 50257 if "gpt2" in name else 256, args.turn_len,
                          args.action_fraction)


def preset_config(name: str, args: argparse.Namespace, batch_np: dict):
    """``(cfg, decision_fraction)`` of an update preset: ``rl.decision_fraction`` just covers the batch's decisions."""
    import numpy as np

    import jaxrl_lm
    from jaxrl_lm.rl import transitions

    p = PRESETS[name]
    decisions_per_row = int(np.asarray(transitions(batch_np, gamma=0.99, time_step="token").decision).sum(1).max())
    fraction = min(1.0, decisions_per_row / p["seq_len"])
    cfg = jaxrl_lm.load_config(p["config"], p["overrides"] + args.override + [
        f"data.batch_size={p['batch']}", f"data.seq_len={p['seq_len']}", f"rl.decision_fraction={fraction}"])
    return cfg, fraction


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)


def export_for_baseline(name: str, args: argparse.Namespace, out_dir: str) -> None:
    """Writes what a baseline preset loads (a subprocess of its own, so that the baseline never imports JAX):
    ``torch``: our initial TrainState at the update preset's config (``torch_ilql_step.export_initial_state``);
    ``hf_generate``: the decode preset's model (``jaxrl_lm.interop.export_hf``)."""
    import jaxrl_lm

    p = PRESETS[name]
    base = PRESETS[p["baseline_of"]]
    if p["runner"] == "hf_generate":
        cfg = jaxrl_lm.load_config(base["config"], base["overrides"] + args.override)
        params = jaxrl_lm.models.split_model(jaxrl_lm.models.build(cfg.model))[1]  # as run_decode builds it
        jaxrl_lm.interop.export_hf(params, cfg.model, out_dir)
        return
    import torch_ilql_step
    from jaxrl_lm.train.flops import update_flops
    from jaxrl_lm.train.sharding import init_sharded_state, setup_parallelism

    cfg, fraction = preset_config(p["baseline_of"], args, preset_batch(p["baseline_of"], args))
    state = init_sharded_state(cfg, setup_parallelism(cfg))  # exactly the state run_preset starts from
    flops = update_flops(cfg, base["batch"], base["seq_len"])
    torch_ilql_step.export_initial_state(cfg, state, out_dir, extra={
        "model_flops_per_token": flops.per_token, "model_flops_per_step": flops.total, "decision_fraction": fraction})


def exported_for(name: str, args: argparse.Namespace, out_dir: str) -> None:
    """Runs ``export_for_baseline`` in a subprocess with the default allocator."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    proc = subprocess.run([sys.executable, __file__, "--preset", name, "--export-to", out_dir] + args.passthrough,
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"exporting the initial weights for {name} failed: {proc.stderr.strip()[-2000:]}")


def run_torch(name: str, args: argparse.Namespace) -> dict:
    """The PyTorch ILQL step (scripts/torch_ilql_step.py) on our exported initial state and the same batch."""
    import torch

    import torch_ilql_step

    p = PRESETS[name]
    base = PRESETS[p["baseline_of"]]
    with tempfile.TemporaryDirectory() as tmp:
        exported_for(name, args, tmp)
        step = torch_ilql_step.TorchILQLStep.from_export(tmp)
        settings = json.loads((Path(tmp) / torch_ilql_step.SETTINGS_FILE).read_text())
    batch = torch_ilql_step.torch_batch(preset_batch(p["baseline_of"], args))
    peak = torch_matmul_peak_gflops()
    first = None
    for _ in range(args.warmup):
        metrics = step.step(batch)
        first = metrics["loss"] if first is None else first
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        metrics = step.step(batch)
        times.append(time.perf_counter() - t0)
        first = metrics["loss"] if first is None else first
    step_s = statistics.median(times)
    tokens = base["batch"] * base["seq_len"]
    total = settings["model_flops_per_step"]
    return {"config": name, "baseline_of": p["baseline_of"], "framework": f"torch {torch.__version__}",
            "threads": torch.get_num_threads(), "allocator": allocator_of(p), "dtype": "float32",
            "batch": base["batch"], "seq_len": base["seq_len"], "n_q_heads": settings["model"]["n_q_heads"],
            "target_scope": settings["token_q"]["target_scope"], "backup": settings["token_q"]["backup"],
            "decision_fraction": round(settings["decision_fraction"], 4),
            "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
            "model_flops_per_token": round(settings["model_flops_per_token"]),
            "model_gflops_per_step": round(total / 1e9, 2), "achieved_gflops": round(total / step_s / 1e9, 1),
            "matmul_peak_gflops": round(peak, 1), "mfu": round(total / step_s / (peak * 1e9), 3),
            "peak_rss_gb": peak_rss_gb(), "first_loss": first, "loss": metrics["loss"]}


def torch_matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best float32 matmul rate torch reaches here, in GFLOP/s (the torch step's MFU denominator)."""
    import torch

    a = torch.randn(n, n)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def run_hf_generate(name: str, args: argparse.Namespace) -> dict:
    """``transformers`` greedy ``generate`` (KV cache) on the decode preset's exported weights and prompts."""
    import numpy as np
    import torch
    import transformers

    p = PRESETS[name]
    base = PRESETS[p["baseline_of"]]
    batch, prompt_len, new_tokens = base["batch"], base["seq_len"], 128
    with tempfile.TemporaryDirectory() as tmp:
        exported_for(name, args, tmp)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    # decode_throughput's prompts: the same seed and draw
    prompt = torch.as_tensor(np.random.default_rng(0).integers(0, vocab, (batch, prompt_len)), dtype=torch.int64)
    settings = transformers.GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                             use_cache=True, pad_token_id=0)

    def generate() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                  generation_config=settings)

    t0 = time.perf_counter()
    out = generate()
    first_s = time.perf_counter() - t0
    if out.shape != (batch, prompt_len + new_tokens):
        raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {(batch, prompt_len + new_tokens)}")
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        generate()
        best = min(best, time.perf_counter() - t0)
    return {"config": name, "baseline_of": p["baseline_of"], "framework": f"transformers {transformers.__version__}",
            "attn_implementation": model.config._attn_implementation, "threads": torch.get_num_threads(),
            "allocator": allocator_of(p), "decoding": "greedy", "batch": batch, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "first_call_s": round(first_s, 3), "decode_s": round(best, 3),
            "new_tokens_per_s": round(batch * new_tokens / best, 3), "step_ms": round(1e3 * best / new_tokens, 3),
            "peak_rss_gb": peak_rss_gb()}


def allocator_of(preset: dict) -> str:
    return preset.get("allocator", "glibc")


def run_preset(name: str, args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    import jaxrl_lm
    from jaxrl_lm.rl import turn_slots, turn_transitions
    from jaxrl_lm.train.flops import update_flops
    from jaxrl_lm.train.mesh import place_batch
    from jaxrl_lm.train.sharding import init_sharded_state, setup_parallelism, state_bytes_per_device
    from jaxrl_lm.models import model_graphdef

    p = PRESETS[name]
    batch_np = preset_batch(name, args)
    cfg, fraction = preset_config(name, args, batch_np)
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

    first = None
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
        first = metrics["loss"] if first is None else first
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        first = metrics["loss"] if first is None else first
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
        "allocator": allocator_of(p),
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
        "vocab_chunk": cfg.model.vocab_chunk,
        "remat": cfg.model.remat,
        "mu_dtype": cfg.optim.mu_dtype,
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
        "peak_rss_gb": peak_rss_gb(),
        "first_loss": float(first),
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
    ap.add_argument("--export-to", help=argparse.SUPPRESS)  # internal: write a baseline preset's weights there
    args = ap.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    # What a preset's subprocess repeats: every option but --only / --preset / --export-to.
    args.passthrough = [a for i, a in enumerate(argv) if not (
        a.startswith(("--only", "--preset", "--export-to")) or argv[i - 1:i] in (["--only"], ["--preset"],
                                                                                 ["--export-to"]))]
    if args.preset:
        if args.export_to:
            export_for_baseline(args.preset, args, args.export_to)
            return
        special = {LOADER_PRESET: run_loader, DECODE_PRESET: run_decode, MESH_PRESET: run_mesh_bytes,
                   ONLINE_PRESET: run_online, BEST_OF_PRESET: run_best_of}
        runner = {"torch": run_torch, "hf_generate": run_hf_generate}.get(PRESETS[args.preset].get("runner"))
        if runner is not None:
            run = lambda a: runner(args.preset, a)  # noqa: E731
        else:
            run = special.get(args.preset, lambda a: run_preset(args.preset, a))
        print(json.dumps(run(args)), flush=True)
        return
    prefixes = tuple(args.only.split(","))
    lines = {}
    for name in PRESETS:
        if not name.startswith(prefixes):
            continue
        env = dict(os.environ)
        if name == MESH_PRESET:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
        if allocator_of(PRESETS[name]) == "jemalloc":
            if not os.path.exists(JEMALLOC):
                print(json.dumps({"config": name, "error": f"{JEMALLOC} not found (apt-get install libjemalloc2)"}),
                      flush=True)
                continue
            env["LD_PRELOAD"] = " ".join(filter(None, [env.get("LD_PRELOAD", ""), JEMALLOC]))
        proc = subprocess.run([sys.executable, __file__, "--preset", name] + args.passthrough,
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(json.dumps({"config": name, "error": proc.stderr.strip().splitlines()[-1:]}), flush=True)
            continue
        line = proc.stdout.strip().splitlines()[-1]
        lines[name] = json.loads(line)
        print(line, flush=True)
    summary = comparison(lines)
    if summary:
        print(json.dumps(summary), flush=True)


def comparison(lines: dict[str, dict]) -> dict:
    """Ratios of ours over the same-run baselines present in ``lines`` and the targets of docs/design.md section 8
    (ratio, goal, met); {} when none of them ran."""
    out: dict = {}

    def target(key: str, ratio: float, goal: float, at_least: bool = True) -> None:
        out[key] = {"ratio": round(ratio, 3), "goal": f"{'>=' if at_least else '<='} {goal}",
                    "met": bool(ratio >= goal if at_least else ratio <= goal)}

    for suffix, goal in (("", 1.3), ("_jemalloc", 1.0)):
        ours, theirs = lines.get(UPDATE_PRESET + suffix), lines.get(TORCH_PRESET + suffix)
        if ours and theirs:
            allocator = suffix.lstrip("_") or "glibc"
            target(f"update_tokens_per_s_vs_torch_{allocator}", ours["tokens_per_s"] / theirs["tokens_per_s"], goal)
            target(f"peak_rss_vs_torch_{allocator}", ours["peak_rss_gb"] / theirs["peak_rss_gb"], 0.6, False)
            out[f"first_loss_abs_diff_{allocator}"] = abs(ours["first_loss"] - theirs["first_loss"])
    for suffix in ("", "_jemalloc"):  # the memory options against the same PyTorch step
        theirs = lines.get(TORCH_PRESET + suffix)
        for name in ("gpt2_small_mem_chunk", "gpt2_small_mem_chunk_remat", "gpt2_small_mem_lean"):
            ours = lines.get(name + suffix)
            if ours and theirs:
                allocator = suffix.lstrip("_") or "glibc"
                target(f"peak_rss_vs_torch_{allocator}_{name.removeprefix('gpt2_small_mem_')}",
                       ours["peak_rss_gb"] / theirs["peak_rss_gb"], 0.6, False)
                out[f"tokens_per_s_vs_torch_{allocator}_{name.removeprefix('gpt2_small_mem_')}"] = round(
                    ours["tokens_per_s"] / theirs["tokens_per_s"], 3)
    if UPDATE_PRESET in lines:
        target("update_mfu", lines[UPDATE_PRESET]["mfu"], 0.6)
    decode, generate = lines.get(DECODE_PRESET), lines.get(HF_GENERATE_PRESET)
    if decode and generate:
        target("decode_bc_greedy_vs_generate", decode["bc_greedy_new_tokens_per_s"] / generate["new_tokens_per_s"],
               2.0)
        out["decode_bc_sampled_vs_generate"] = round(decode["bc_new_tokens_per_s"] / generate["new_tokens_per_s"], 3)
        out["decode_ilql_vs_generate"] = round(decode["ilql_new_tokens_per_s"] / generate["new_tokens_per_s"], 3)
    return {"config": "comparison", **out} if out else {}


if __name__ == "__main__":
    main()
