"""bench/gpu.sh's bounded-KV step at small sizes on CPU: it runs, and its compaction is the real one
(the ring ends with the top-M by retention score, as kernels/retention/ops.compact_ specifies)."""
import json

from kernels.vllm_plugin.bounded_kv import bench_gpu


def test_quick_run_writes_rows(tmp_path):
    out = tmp_path / "b.json"
    assert bench_gpu.main(["--quick", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["context"] for r in rows] == [512, 1024]
    assert all(r["ring"] == 96 and r["bounded_step_us"] > 0 and r["full_step_us"] > 0 for r in rows)
