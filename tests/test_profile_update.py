"""scripts/profile_update.py: XLA's buffer assignment of a benchmark preset's update, read back as JSON."""

import json
import os
import subprocess
import sys

from script_loader import SCRIPTS, load_script

SAMPLE = """BufferAssignment:
allocation 0: size 1024, parameter 3, shape |f32[16,16]| at ShapeIndex {}, maybe-live-out:
 value: <10 p.3 @0> (size=1024,offset=0): f32[16,16]{1,0}
allocation 1: size 4096, preallocated-temp:
 value: <11 fusion.1 @0> (size=2048,offset=0): f32[2,256]{1,0}
 value: <12 dot.2 @0> (size=4096,offset=0): f32[4,256]{1,0}
allocation 2: size 4, output shape is |f32[]|, maybe-live-out:
 value: <13 reduce.3 @0> (size=4,offset=0): f32[]
"""


def test_buffer_assignment_is_parsed_by_allocation_kind_and_value():
    allocations = load_script("profile_update").parse_buffer_assignment(SAMPLE)
    assert [(a["index"], a["bytes"], a["kind"]) for a in allocations] == [
        (0, 1024, "parameter"), (1, 4096, "temporary"), (2, 4, "output")]
    assert allocations[1]["values"] == [("fusion.1", "f32[2,256]{1,0}"), ("dot.2", "f32[4,256]{1,0}")]


def test_profile_of_the_tiny_preset_lists_its_largest_temporaries(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(SCRIPTS / "profile_update.py"), "tiny", "--top", "5",
                           "--dump-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["config"] == "tiny" and report["mem_temp_gb"] > 0
    assert 0 < len(report["largest_temporaries"]) <= 5
    assert report["temporary_gb_total"] >= report["largest_temporaries"][0]["gb"] > 0
    assert any("[" in v for v in report["largest_temporaries"][0]["values"])  # names with shapes
    assert os.path.exists(report["buffer_assignment"])
