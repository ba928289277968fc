"""`onevision batch --ray` on a real local Ray cluster (ray.init with 2 CPUs, as in CI): the Ray Data pipeline
(CPU prepare stage -> engine actor stage) writes the same records as the local run of the same JSONL.

    pytest tests/test_batch_ray.py -q
"""

from __future__ import annotations

import pytest
from test_batch import BAD, GOOD, answers, config, mixed_lines, records, write_jsonl

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def errors(recs: list[dict]) -> dict:
    return {(r["custom_id"], r["error"]["line"]): (r["error"]["code"], r["error"]["message"],
                                                   (r["response"] or {}).get("status_code"))
            for r in recs if r["error"] is not None}


def test_ray_pipeline_writes_the_same_records_as_the_local_run(cluster, tiny_ckpt, tmp_path):
    from onevision.batch import load_engine, run

    source = write_jsonl(tmp_path / "requests.jsonl", mixed_lines())
    local = run(str(source), str(tmp_path / "local.jsonl"), config=config(), progress=False,
                engine=load_engine(str(tiny_ckpt), dtype="float32", device="cpu", kv_cache_memory=64 << 20))
    on_ray = run(str(source), str(tmp_path / "ray.jsonl"), model=str(tiny_ckpt), config=config(), dtype="float32",
                 progress=False, ray=True, ray_replicas=1, ray_num_cpus=1, ray_prepare_cpus=0.5, ray_batch_size=4,
                 engine_kwargs={"kv_cache_memory": 64 << 20})
    assert (on_ray.succeeded, on_ray.failed) == (local.succeeded, local.failed) == (len(GOOD), len(BAD))
    assert on_ray.exit_code == local.exit_code == 1
    ours, theirs = records(tmp_path / "ray.jsonl"), records(tmp_path / "local.jsonl")
    assert answers(ours) == answers(theirs) and len(answers(ours)) == len(GOOD)
    assert errors(ours) == errors(theirs) and len(errors(ours)) == len(BAD)
    # resumed on Ray: nothing is run twice
    again = run(str(source), str(tmp_path / "ray.jsonl"), model=str(tiny_ckpt), config=config(), dtype="float32",
                progress=False, ray=True, ray_prepare_cpus=0.5)
    assert again.skipped == len(GOOD) + len(BAD) and records(tmp_path / "ray.jsonl") == ours
