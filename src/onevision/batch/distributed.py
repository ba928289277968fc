"""`onevision batch --ray`: the same job as a Ray Data pipeline (needs `pip install "onevision[ray]"`).

    requests (read and checked on the driver; resume skips and bad lines are handled there)
      -> ray.data.from_items
      -> map_batches(PrepareStage)  CPU actors: the server's schema/checks, media decoding, chat template,
                                    tokenizing -> model inputs (no weights loaded)
      -> map_batches(EngineStage)   `replicas` actors, one Engine each (`num_cpus` / `num_gpus` per actor);
                                    up to `batches_per_replica` batches share its continuous batching
      -> records, appended and flushed on the driver as they arrive (any order, like the local run)

A row that fails becomes an error record in its stage; no row can take an actor down.
"""

from __future__ import annotations

import json
import logging
import pickle
from typing import Any

from onevision.batch import ModelFacts, Running, State, build, load_engine
from onevision.batch.records import Request, dumps, error_record, new_id
from onevision.interrupt import interrupt_event

log = logging.getLogger("onevision.batch")

INSTALL = 'pip install "onevision[ray]"'


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError(f"--ray needs Ray Data, which is not installed: {INSTALL}") from None
    return ray


class PrepareStage:
    """CPU stage: body -> pickled (inputs, params, prompt_tokens), or an error record."""

    def __init__(self, model: str, config, dtype: str, revision: str | None):
        from onevision import AutoProcessor

        hub = {"revision": revision} if revision else {}
        self.state = State(ModelFacts(model, dtype="auto" if dtype == "auto" else dtype, revision=revision),
                           AutoProcessor.from_pretrained(model, **hub), config)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from onevision.server.errors import APIError, Internal

        out: dict[str, list] = {"line": [], "custom_id": [], "payload": [], "record": []}
        for line, custom_id, body in zip(batch["line"], batch["custom_id"], batch["body"]):
            request = Request(int(line), str(custom_id), json.loads(body))
            payload, record = b"", ""
            try:
                inputs, *rest = build(request, self.state)
                inputs = {k: v.cpu() if hasattr(v, "cpu") else v for k, v in inputs.items()}
                payload = pickle.dumps((inputs, *rest))
            except APIError as e:
                record = dumps(error_record(request.line, request.custom_id, e))
            except Exception:  # noqa: BLE001 - a row must not take the actor down
                record = dumps(error_record(request.line, request.custom_id, Internal(
                    f"internal error while preparing line {request.line}", code="internal_error")))
            out["line"].append(request.line)
            out["custom_id"].append(request.custom_id)
            out["payload"].append(payload)
            out["record"].append(record)
        return out


class EngineStage:
    """Engine stage: one Engine per actor, run on its own thread (AsyncEngine). Ray calls the actor with up to
    `max_concurrency` batches at once; every batch's requests go into the same continuous batching, and each call
    returns its batch's records when they are all done."""

    def __init__(self, model: str, model_name: str, dtype: str, device: str, quantize: str | None,
                 revision: str | None, engine_kwargs: dict):
        import torch

        from onevision.engine.async_engine import AsyncEngine

        if device == "auto":  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs
            device = "cuda" if torch.cuda.is_available() else "cpu"
        engine = load_engine(model, dtype=dtype, device=device, quantize=quantize, revision=revision,
                             **engine_kwargs)
        self.model, self.model_name = engine.model, model_name
        self.engine = AsyncEngine(engine)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        import threading

        import torch

        model = self.model
        records: list[str | None] = []
        tokens: list[int] = []
        lock, left, all_done = threading.Lock(), [0], threading.Event()

        def sink_for(i: int, job: Running):
            def sink(out) -> None:  # on the engine thread
                if isinstance(out, BaseException):
                    record, count = (job.refused(out) if isinstance(out, (ValueError, TypeError))
                                     else job.failed()), 0
                elif out.finished:
                    record, count = job.answered(out, self.model_name)
                else:
                    return
                with lock:
                    records[i], tokens[i] = dumps(record), count
                    left[0] -= 1
                    if left[0] == 0:
                        all_done.set()
            return sink

        jobs = []
        for line, custom_id, payload, record in zip(batch["line"], batch["custom_id"], batch["payload"],
                                                    batch["record"]):
            records.append(record or None)
            tokens.append(0)
            if not record:
                inputs, params, prompt_tokens, copies = pickle.loads(payload)
                inputs = {k: v.to(model.device, model.dtype) if torch.is_tensor(v) and v.is_floating_point()
                          else v.to(model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
                job = Running(Request(int(line), str(custom_id), None), new_id("req-"), prompt_tokens, copies)
                jobs.append((len(records) - 1, job, inputs, params))
        left[0] = len(jobs)
        if not jobs:
            return {"record": records, "tokens": tokens}
        for i, job, inputs, params in jobs:
            sink = sink_for(i, job)
            try:
                self.engine.add(job.request_id, inputs, params, sink)
            except Exception as e:  # noqa: BLE001 - the engine is stopping: the row still gets its record
                sink(e)
        all_done.wait()
        return {"record": records, "tokens": tokens}


def run_ray(items, writer, *, model: str, config, model_name: str, dtype: str, device: str, quantize: str | None,
            revision: str | None, engine_kwargs: dict, address: str | None, replicas: int, num_cpus: float,
            num_gpus: float, prepare_workers: int, prepare_cpus: float, batch_size: int,
            batches_per_replica: int = 4) -> None:
    ray = require_ray()
    rows = [{"line": r.line, "custom_id": r.custom_id, "body": json.dumps(r.body)} for r in items]
    if not rows:
        return
    if not ray.is_initialized():
        ray.init(address=address, **({} if address else {"include_dashboard": False}))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job's own bar (records written) is on stderr
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    blocks = max(1, min(len(rows) // batch_size, 1000))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(PrepareStage, fn_constructor_kwargs=dict(model=model, config=config, dtype=dtype,
                                                                   revision=revision),
                        batch_size=batch_size, num_cpus=prepare_cpus,
                        compute=ray.data.ActorPoolStrategy(size=prepare_workers))
    ds = ds.map_batches(EngineStage, fn_constructor_kwargs=dict(model=model, model_name=model_name, dtype=dtype,
                                                                  device=device, quantize=quantize,
                                                                  revision=revision, engine_kwargs=engine_kwargs),
                        batch_size=batch_size, num_cpus=num_cpus, num_gpus=num_gpus,
                        compute=ray.data.ActorPoolStrategy(
                            size=replicas, max_tasks_in_flight_per_actor=batches_per_replica,
                            max_concurrent_calls_per_actor=batches_per_replica, enable_true_multi_threading=True))
    # Ctrl-C: the KeyboardInterrupt Python would raise inside Ray's own code makes Ray cancel the tasks in flight,
    # whose requests come back as error records, and the job goes on. The first one stops after the batch in hand.
    def say_stopping():
        log.warning("interrupted: stopping after the batch in hand (Ctrl-C again to stop at once; a rerun resumes "
                    "the rest)")

    with interrupt_event(at_once=False, on_first=say_stopping) as interrupted:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for record, tokens in zip(batch["record"], batch["tokens"]):
                writer.put(json.loads(record), int(tokens))
            if interrupted.is_set():  # what is written is whole; a rerun resumes the rest
                raise KeyboardInterrupt


__all__ = ["EngineStage", "PrepareStage", "require_ray", "run_ray"]
