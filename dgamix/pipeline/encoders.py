"""Faster CPU encoders for the embed stage: the sentence-transformers model exported to OpenVINO, here, offline.

Backends (`embed.backend`):
- `torch`: the sentence-transformers model as is (fp32 on CPU, fp16 on CUDA). The reference.
- `openvino`: the same graph (transformer + the model's own pooling and normalization modules) exported with
  torch.export and run by OpenVINO on the CPU. OpenVINO picks the execution precision: bf16 on CPUs with AMX,
  fp32 elsewhere; the sidecar records which.
- `openvino-int8`: that graph post-training quantized to int8 (weights and activations) by NNCF, calibrated on a
  seeded sample of the corpus being embedded, so no dataset is ever downloaded.

The export is written once under `<embed.output>/encoder/<backend>/` (with `export.json` saying what it was made
from) and reused by every later run and by every Ray actor, so all workers embed with the very same graph.
Tokenization stays with the sentence-transformers model, so truncation and special tokens are identical to torch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.atomic import atomic_path, write_json
from ..core.errors import ParamError

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
CALIBRATION_BATCH = 16  # sequences per NNCF calibration batch


def _require_openvino(backend: str) -> Any:
    try:
        import openvino

        if backend == "openvino-int8":
            import nncf  # noqa: F401
    except ImportError as err:
        raise ParamError(f"embed.backend = '{backend}' needs the openvino extra: pip install 'dgamix[openvino]' "
                         f"({err})") from err
    return openvino


def sentence_embedding_module(st_model: Any) -> Any:
    """The sentence-transformers pipeline after tokenization as one traceable module: input ids -> embedding."""
    import torch

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, model: Any):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.model[0].auto_model(input_ids=input_ids, attention_mask=attention_mask,
                                              token_type_ids=token_type_ids, return_dict=True).last_hidden_state
            features = {"token_embeddings": hidden, "attention_mask": attention_mask}
            for module in list(self.model)[1:]:  # the model's own pooling, dense and normalize modules
                features = module(features)
            return features["sentence_embedding"]

    return SentenceEmbedding(st_model).eval()


def tokenize(st_model: Any, texts: list[str]) -> dict[str, np.ndarray]:
    """The sentence-transformers tokenization (its truncation at max_seq_length), as int64 numpy inputs."""
    features = (getattr(st_model, "preprocess", None) or st_model.tokenize)(texts)
    out = {}
    for name in MODEL_INPUTS:
        if name in features:
            out[name] = features[name].numpy()
        elif name == "token_type_ids":  # models without segment ids: all zeros, as BERT does by default
            out[name] = np.zeros_like(features["input_ids"].numpy())
    return out


def export_openvino(st_model: Any, out_dir: Path, calibration_texts: list[str] | None) -> Path:
    """Export the model to OpenVINO IR at out_dir/model.xml; quantized to int8 when calibration texts are given."""
    import torch

    ov = _require_openvino("openvino-int8" if calibration_texts else "openvino")
    module = sentence_embedding_module(st_model)
    example = tokenize(st_model, ["an example sentence to trace the graph", "and a second, longer one " * 4])
    args = tuple(torch.from_numpy(example[name]) for name in MODEL_INPUTS)
    positions = getattr(st_model[0].auto_model.config, "max_position_embeddings", 512)
    batch, seq = torch.export.Dim("batch", max=1 << 16), torch.export.Dim("seq", max=int(positions))
    exported = torch.export.export(module, args, dynamic_shapes=({0: batch, 1: seq},) * len(args), strict=False)
    ov_model = ov.convert_model(exported)
    if calibration_texts:
        import nncf

        batches = [tokenize(st_model, calibration_texts[i : i + CALIBRATION_BATCH])
                   for i in range(0, len(calibration_texts), CALIBRATION_BATCH)]
        ov_model = nncf.quantize(ov_model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                                 subset_size=len(batches))
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        ov.save_model(ov_model, str(tmp / "model.xml"), compress_to_fp16=False)
    return out_dir / "model.xml"


class OpenVINOEncoder:
    """The subset of SentenceTransformer that embed_texts uses (encode, max_seq_length, dimension), on OpenVINO."""

    def __init__(self, st_model: Any, model_xml: Path, backend: str, precision: str | None = None):
        ov = _require_openvino(backend)
        self.st_model = st_model
        self.backend = backend
        core = ov.Core()
        # precision None: OpenVINO's choice; "f32" forces fp32 where it would pick bf16 (benchmarks use it to show
        # what a CPU without AMX gets).
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            # A Ray worker is given its share of the CPUs this way; OpenVINO would otherwise use every core.
            config["INFERENCE_NUM_THREADS"] = int(os.environ["OMP_NUM_THREADS"])
        self.compiled = core.compile_model(str(model_xml), "CPU", config)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # bf16 on CPUs with AMX, else f32
        self.precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)

    @property
    def max_seq_length(self) -> int:
        return self.st_model.max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.st_model.max_seq_length = value

    def get_embedding_dimension(self) -> int:
        return int(self.compiled.outputs[0].get_partial_shape()[1].get_length())

    def encode(self, texts: list[str], batch_size: int = 64, **_: Any) -> np.ndarray:
        request = self.compiled.create_infer_request()
        out = np.empty((len(texts), self.get_embedding_dimension()), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            inputs = tokenize(self.st_model, texts[start : start + batch_size])
            out[start : start + len(inputs["input_ids"])] = request.infer(inputs)[0]
        return out


def export_fingerprint(model: str, backend: str, calibration_texts: list[str] | None) -> dict[str, Any]:
    """What an export was made from: a different model, backend, library or calibration sample means re-export."""
    import openvino

    meta: dict[str, Any] = {"model": model, "backend": backend, "openvino": openvino.__version__}
    if calibration_texts is not None:
        import nncf

        digest = hashlib.blake2b(digest_size=16)
        for text in calibration_texts:
            digest.update(text.encode())
            digest.update(b"\0")
        meta.update({"nncf": nncf.__version__, "calibration_docs": len(calibration_texts),
                     "calibration_fingerprint": digest.hexdigest()})
    return meta


def ensure_openvino_export(load_st_model: Callable[[], Any], model: str, backend: str, cache_dir: Path,
                           calibration_texts: list[str] | None = None) -> Path:
    """Make sure cache_dir/<backend> holds the export of `model` (exporting when it is missing or was made from
    something else); returns its export.json. The torch model is loaded only when an export is needed."""
    _require_openvino(backend)
    if backend == "openvino-int8" and not calibration_texts:
        raise ParamError("embed.backend = 'openvino-int8' needs calibration texts (a sample of the corpus)")
    out_dir = Path(cache_dir) / backend
    wanted = export_fingerprint(model, backend, calibration_texts if backend == "openvino-int8" else None)
    meta_path = out_dir / "export.json"
    recorded = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if recorded != wanted or not (out_dir / "model.xml").exists():
        log.info("embed: exporting %s to %s (%s)", model, backend, out_dir)
        meta_path.unlink(missing_ok=True)
        export_openvino(load_st_model(), out_dir, calibration_texts if backend == "openvino-int8" else None)
        write_json(wanted, meta_path)  # written last: marks the export complete
    return meta_path

