"""`onevision batch --ray`: the same job as a Ray Data pipeline (needs `pip install "onevision[ray]"`).

    requests (read and checked on the driver; resume skips and bad lines are handled there)
      -> ray.data.from_items
      -> map_batches(PrepareStage)  CPU actors: the server's schema/checks, media decoding, chat template,
                                    tokenizing -> model inputs (no weights loaded)
      -> map_batches(EngineStage)   `replicas` actors, one Engine each (`num_cpus` / `num_gpus` per actor):
                                    every row of a batch goes into the engine's continuous batching at once
      -> records, appended and flushed on the driver as they arrive (any order, like the local run)

A row that fails becomes an error record in its stage; no row can take an actor down.
"""

from __future__ import annotations

import json
import pickle
from typing import Any

from onevision.batch import Driver, ModelFacts, State, build, load_engine
from onevision.batch.records import Request, dumps, error_record

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
    """Engine stage: one Engine per actor; a batch's requests run together, its records come back."""

    def __init__(self, model: str, model_name: str, dtype: str, device: str, quantize: str | None,
                 revision: str | None, engine_kwargs: dict):
        import torch

        if device == "auto":  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs
            device = "cuda" if torch.cuda.is_available() else "cpu"
        hub = {"revision": revision} if revision else {}
        self.engine = load_engine(model, dtype=dtype, device=device, quantize=quantize, **hub, **engine_kwargs)
        self.model_name = model_name

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        import torch

        model = self.engine.model
        driver = Driver(self.engine, self.model_name)
        records, tokens, index = [], [], {}
        for line, custom_id, payload, record in zip(batch["line"], batch["custom_id"], batch["payload"],
                                                    batch["record"]):
            if not record:
                inputs, *rest = pickle.loads(payload)
                inputs = {k: v.to(model.device, model.dtype) if torch.is_tensor(v) and v.is_floating_point()
                          else v.to(model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
                request = Request(int(line), str(custom_id), None)
                refused = driver.submit(request, inputs, *rest)
                record = dumps(refused) if refused is not None else None
            index[str(custom_id)] = len(records)
            records.append(record)
            tokens.append(0)
        try:
            while driver.running:
                for done, count in driver.step():
                    i = index[done["custom_id"]]
                    records[i], tokens[i] = dumps(done), count
        finally:
            driver.abort_all()
        return {"record": records, "tokens": tokens}


def run_ray(items, writer, *, model: str, config, model_name: str, dtype: str, device: str, quantize: str | None,
            revision: str | None, engine_kwargs: dict, address: str | None, replicas: int, num_cpus: float,
            num_gpus: float, prepare_workers: int, prepare_cpus: float, batch_size: int) -> None:
    ray = require_ray()
    rows = [{"line": r.line, "custom_id": r.custom_id, "body": json.dumps(r.body)} for r in items]
    if not rows:
        return
    if not ray.is_initialized():
        ray.init(address=address, **({} if address else {"include_dashboard": False}))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job's own bar (records written) is on stderr
    blocks = max(1, min(len(rows) // batch_size, 1000))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(PrepareStage, fn_constructor_kwargs=dict(model=model, config=config, dtype=dtype,
                                                                   revision=revision),
                        batch_size=batch_size, concurrency=prepare_workers, num_cpus=prepare_cpus)
    ds = ds.map_batches(EngineStage, fn_constructor_kwargs=dict(model=model, model_name=model_name, dtype=dtype,
                                                                  device=device, quantize=quantize,
                                                                  revision=revision, engine_kwargs=engine_kwargs),
                        batch_size=batch_size, concurrency=replicas, num_cpus=num_cpus, num_gpus=num_gpus)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for record, tokens in zip(batch["record"], batch["tokens"]):
            writer.put(json.loads(record), int(tokens))


__all__ = ["EngineStage", "PrepareStage", "require_ray", "run_ray"]
