"""Where the update's memory goes: XLA's buffer assignment of one ``scripts/benchmark.py`` update preset.

    python scripts/profile_update.py gpt2_small_heads_k2            # the 25 largest buffers, grouped by shape
    python scripts/profile_update.py gpt2_small_mem_chunk --top 40 --override model.remat=full

Compiles the preset's update exactly as the benchmark does (same config, batch and shardings), with XLA's dump of
the optimised module and its buffer assignment, and prints one JSON line: the compiled memory analysis (arguments,
outputs, temporaries, GB) and the largest temporary allocations. Each allocation is listed with its size, what
XLA put in it (the HLO values sharing it, by instruction name and shape) and whether it is a parameter, an output
or a temporary. Nothing runs: this reads the compiled program only (docs/benchmarks.md, "Where the memory goes").
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tempfile


def parse_buffer_assignment(text: str) -> list[dict]:
    """Allocations of an XLA ``*buffer-assignment.txt``: ``[{index, bytes, kind, values: [(name, shape)]}]``."""
    allocations = []
    current = None
    for line in text.splitlines():
        head = re.match(r"allocation (\d+): size (\d+)(.*)", line)
        if head:
            flags = head.group(3)
            kind = ("parameter" if "parameter" in flags else "output" if "output" in flags
                    else "constant" if "constant" in flags else "thread-local" if "thread-local" in flags
                    else "temporary")
            current = {"index": int(head.group(1)), "bytes": int(head.group(2)), "kind": kind, "values": []}
            allocations.append(current)
            continue
        value = re.match(r"\s+value: <\d+ ([^ ]+) @\d+> \(size=(\d+),offset=(\d+)\): (\S+)", line)
        if value and current is not None:
            current["values"].append((value.group(1), value.group(4)))
    return allocations


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", help="an update preset of scripts/benchmark.py (e.g. gpt2_small_heads_k2)")
    ap.add_argument("--top", type=int, default=25, help="largest allocations listed")
    ap.add_argument("--override", action="append", default=[], help="extra config override")
    ap.add_argument("--dump-dir", default="", help="keep XLA's dump here (default: a temporary directory)")
    args = ap.parse_args(argv)

    dump = args.dump_dir or tempfile.mkdtemp(prefix="xla_dump_")
    # XLA reads its flags when the backend starts: set them before JAX initialises.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={dump} --xla_dump_hlo_as_text").strip()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import benchmark  # noqa: E402  the presets and their batches, from the benchmark itself

    import jaxrl_lm  # noqa: E402
    from jaxrl_lm.models import model_graphdef  # noqa: E402
    from jaxrl_lm.train.mesh import place_batch  # noqa: E402
    from jaxrl_lm.train.sharding import init_sharded_state, setup_parallelism  # noqa: E402

    bench_args = argparse.Namespace(turn_len=16, action_fraction=0.5, override=args.override, steps=0, warmup=0)
    batch_np = benchmark.preset_batch(args.preset, bench_args)
    cfg, _ = benchmark.preset_config(args.preset, bench_args, batch_np)
    par = setup_parallelism(cfg)
    state = init_sharded_state(cfg, par)
    update = jaxrl_lm.train.make_update(cfg, model_graphdef(cfg.model), state_sharding=par.state_sharding,
                                        batch_sharding=par.batch_sharding)
    compiled = update.lower(state, place_batch(batch_np, par.mesh)).compile()
    mem = compiled.memory_analysis()

    files = sorted(glob.glob(os.path.join(dump, "*update*buffer-assignment.txt")), key=os.path.getsize)
    if not files:
        raise SystemExit(f"no buffer assignment of the update in {dump}: XLA_FLAGS were not applied")
    allocations = parse_buffer_assignment(open(files[-1]).read())
    gb = 1024**3
    temporaries = sorted((a for a in allocations if a["kind"] == "temporary"), key=lambda a: -a["bytes"])
    top = [{"gb": round(a["bytes"] / gb, 4), "kind": a["kind"],
            "values": [f"{name} {shape}" for name, shape in a["values"][:4]] + (
                [f"... {len(a['values']) - 4} more"] if len(a["values"]) > 4 else [])}
           for a in temporaries[: args.top]]
    print(json.dumps({
        "config": args.preset, "overrides": args.override,
        "mem_argument_gb": round(mem.argument_size_in_bytes / gb, 3),
        "mem_output_gb": round(mem.output_size_in_bytes / gb, 3),
        "mem_temp_gb": round(mem.temp_size_in_bytes / gb, 3),
        "temporary_allocations": len(temporaries),
        "temporary_gb_total": round(sum(a["bytes"] for a in temporaries) / gb, 3),
        "buffer_assignment": files[-1],
        "largest_temporaries": top,
    }, indent=1))


if __name__ == "__main__":
    main()
