"""In-batch alignment on Hugging Face causal LMs built from tiny configs (real transformers, CPU, fixed seeds, no
download): GPT-2 (Conv1D layers, a head tied to the token embedding, position ids of shape (1, T) broadcast over the
batch), Llama (RMSNorm, rotary positions, untied head, no biases, a padding row) and GPT-NeoX (LayerNorm, rotary,
untied head). Every sequence's score against torch.func per-sequence gradients of transformers' own loss."""
from __future__ import annotations

import warnings

import pytest
import torch

from dgamix.mixer.inbatch import InBatchAlignment, mean_loss_scale

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH, PAD = 64, 8, 4, 3
FAMILIES = ("gpt2", "llama", "gpt_neox")


def tiny_model(family: str) -> torch.nn.Module:
    """2 layers, 32 wide, eager attention, no dropout (torch.func replays the forward sequence by sequence)."""
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0, attn_implementation="eager")
        return transformers.GPT2LMHeadModel(config)
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=16, pad_token_id=PAD, bos_token_id=1,
                                          eos_token_id=2, attn_implementation="eager")
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16, attention_dropout=0.0,
                                        hidden_dropout=0.0, bos_token_id=0, eos_token_id=0,
                                        attn_implementation="eager")
    return transformers.GPTNeoXForCausalLM(config)


def hf_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' causal LM loss: labels shifted inside the model, cross-entropy averaged over the B * (T - 1)
    predicted tokens, so each sequence's loss (its own token mean) has weight 1 / B: loss_scale = 1 / B."""
    return model(input_ids=tokens, labels=tokens).loss


def _tokens(n: int, seed: int) -> torch.Tensor:
    tokens = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    tokens[:, 2] = PAD  # Llama's padding row: its embedding gets no gradient
    return tokens


def _trained(family: str, steps: int = 2) -> torch.nn.Module:
    """A few AdamW steps in: norm weights and biases away from their initial ones and zeros."""
    model = tiny_model(family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        optimizer.zero_grad()
        hf_loss(model, _tokens(BATCH, 100 + step)).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model


def per_sequence_gradients(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """(B, number of trainable parameters): each sequence's gradient of its own loss (transformers' loss on that
    sequence alone), by torch.func, flat in named_parameters() order (a tied weight once, both its uses summed)."""
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in model.named_parameters()}

    def sequence_loss(p, sequence):
        return functional_call(model, p, (), {"input_ids": sequence[None], "labels": sequence[None]}).loss

    per_sequence = vmap(grad(sequence_loss), in_dims=(None, 0))(params, batch)
    return torch.cat([per_sequence[name].reshape(len(batch), -1) for name in params], dim=1).double()


def _scores(model: torch.nn.Module, tracker: InBatchAlignment, batch: torch.Tensor, **kwargs) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model(input_ids=batch, labels=batch, **kwargs).loss.backward()
    return tracker.collect(loss_scale=mean_loss_scale(len(batch)), n_sequences=len(batch))


def _assert_matches(scores: torch.Tensor, exact: torch.Tensor) -> float:
    """rtol 1e-4 per sequence (fp32 model and fp32 dot products), with a floor at 1e-5 of the largest |d|."""
    torch.testing.assert_close(scores, exact, rtol=1e-4, atol=1e-5 * exact.abs().max().item())
    return ((scores - exact).abs() / exact.abs()).max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_match_torch_func_per_sequence_gradients(family):
    """Full coverage at construction (no parameter left out, no warning), and every d_x equal to the torch.func
    per-sequence gradient dotted with g, for a random g (every block non-zero, the padding row included) and for
    the target gradient of a target batch; the sum of the scores equals <.grad, g> of the batch (observed: relative
    error 1e-6 to 1e-5)."""
    model = _trained(family)
    batch = _tokens(BATCH, 1)
    flat = per_sequence_gradients(model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full coverage: no partial-coverage warning either
        tracker = InBatchAlignment(model)
        coverage = tracker.coverage()
        assert coverage.exact and coverage.covered == tuple(name for name, _ in model.named_parameters())
        random_g = torch.randn(flat.shape[1], generator=torch.Generator().manual_seed(2))
        tracker.set_target(random_g)
        assert tracker.coverage().target_share == pytest.approx(1.0)
        worst = _assert_matches(_scores(model, tracker, batch), flat @ random_g.double())
        kinds = {tap.kind for tap in tracker._taps}
        g = tracker.refresh_target(lambda t: hf_loss(model, t), [_tokens(BATCH, 7)])
        scores = _scores(model, tracker, batch)
        worst = max(worst, _assert_matches(scores, flat @ g.double()))
        assert float(scores.sum()) / BATCH == pytest.approx(tracker.gradient_dot(), rel=1e-5)
        layers = tracker.last_layer_terms
        tracker.close()
    print(f"\n{family}: max per-sequence relative error {worst:.1e}")
    expected_kinds = {"gpt2": {"embedding", "layer_norm", "conv1d", "linear"},
                      "llama": {"embedding", "rms_norm", "linear"},
                      "gpt_neox": {"embedding", "layer_norm", "linear"}}[family]
    assert kinds == expected_kinds  # every module family of the model is tapped, none by accident
    if family == "gpt2":  # both uses of the tied weight, and the broadcast positions scored per sequence
        assert model.lm_head.weight is model.transformer.wte.weight
        assert {"transformer.wte", "lm_head", "transformer.wpe"} <= set(layers)
        wpe = layers["transformer.wpe"]
        assert wpe.shape == (BATCH,) and wpe.abs().min() > 0 and len(set(wpe.tolist())) == BATCH
    model.zero_grad(set_to_none=True)


def test_gpt2_training_is_bit_identical_with_and_without_the_tracker():
    """The tracker expands GPT-2's (1, T, D) position embedding to (B, T, D) in the forward: same values, and its
    backward sums over the batch as the broadcast did, so every .grad and weight of 3 AdamW steps is equal."""
    def run(track: bool):
        model = tiny_model("gpt2")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        tracker = InBatchAlignment(model) if track else None
        grads = []
        for step in range(3):
            optimizer.zero_grad()
            if tracker is not None:
                tracker.refresh_target(lambda t: hf_loss(model, t), [_tokens(BATCH, 20 + step)])
            hf_loss(model, _tokens(BATCH, 10 + step)).backward()
            if tracker is not None:
                tracker.collect(loss_scale=1 / BATCH)
            grads.append([p.grad.clone() for p in model.parameters()])
            optimizer.step()
        if tracker is not None:
            assert len(tracker.take()) == 3
            tracker.close()
        return grads, [p.detach().clone() for p in model.parameters()]

    plain, tracked = run(False), run(True)
    assert all(torch.equal(a, b) for step_a, step_b in zip(plain[0], tracked[0]) for a, b in zip(step_a, step_b))
    assert all(torch.equal(a, b) for a, b in zip(plain[1], tracked[1]))


def test_gpt2_position_ids_without_expansion_are_refused_with_what_to_pass():
    """expand_shared=False: the (1, T) position lookup hides per-sequence gradients; collect names the fix, and
    batch-shaped position_ids give the same scores as the automatic expansion."""
    model = _trained("gpt2")
    batch = _tokens(BATCH, 1)
    loss_fn = lambda t: hf_loss(model, t)  # noqa: E731
    with InBatchAlignment(model) as tracker:
        tracker.refresh_target(loss_fn, [_tokens(BATCH, 7)])
        expanded = _scores(model, tracker, batch)
    with InBatchAlignment(model, expand_shared=False) as tracker:
        tracker.refresh_target(loss_fn, [_tokens(BATCH, 7)])
        model.zero_grad(set_to_none=True)
        loss_fn(batch).backward()
        with pytest.raises(ValueError, match=r"'transformer.wpe': 1.*position_ids=torch.arange\(T\).expand\(B, T\)"):
            tracker.collect(loss_scale=1 / BATCH)
        positions = torch.arange(SEQ).expand(BATCH, SEQ)
        explicit = _scores(model, tracker, batch, position_ids=positions)
    torch.testing.assert_close(explicit, expanded, rtol=1e-5, atol=1e-7)
    model.zero_grad(set_to_none=True)


def test_two_trackers_on_one_gpt2_both_score_every_sequence():
    """The first tracker's hook expands the position lookup; the second then sees B rows of output for one row of
    ids, and must expand the ids it keeps too (as a benchmark comparing exact and low-rank trackers does)."""
    model = _trained("gpt2")
    batch = _tokens(BATCH, 1)
    flat = per_sequence_gradients(model, batch)
    g = torch.randn(flat.shape[1], generator=torch.Generator().manual_seed(2))
    with InBatchAlignment(model) as first, InBatchAlignment(model) as second:
        first.set_target(g)
        second.set_target(g)
        model.zero_grad(set_to_none=True)
        hf_loss(model, batch).backward()
        scores = [tracker.collect(loss_scale=1 / BATCH, n_sequences=BATCH) for tracker in (first, second)]
    torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=0)
    _assert_matches(scores[1], flat @ g.double())
    model.zero_grad(set_to_none=True)


def test_gpt2_low_rank_conv1d_factors_are_exact_at_full_rank():
    """Conv1D keeps W as (in, out): its factors are of G_W transposed. At rank >= min(d_in, d_out) the factors are
    an exact SVD, so the scores equal the exact ones (a wrong orientation fails on the square c_proj layers)."""
    model = _trained("gpt2")
    batch, target = _tokens(BATCH, 1), [_tokens(BATCH, 7)]
    loss_fn = lambda t: hf_loss(model, t)  # noqa: E731
    with InBatchAlignment(model) as tracker:
        tracker.refresh_target(loss_fn, target)
        exact = _scores(model, tracker, batch)
    with InBatchAlignment(model, rank=10 ** 6, low_rank_min_params=0) as tracker:
        tracker.refresh_target(loss_fn, target)
        full = _scores(model, tracker, batch)
        factored = set(tracker.low_rank_layers)
    conv = {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                  "mlp.c_proj")}
    assert factored == conv | {"lm_head"}
    torch.testing.assert_close(full, exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())
    model.zero_grad(set_to_none=True)


def test_only_rms_norms_that_compute_llamas_formula_are_supported():
    """Llama's RMSNorm and its line-for-line copies (Qwen2's) are tapped; Gemma's, which scales by (1 + w), is not:
    a model holding it is refused at full coverage rather than scored with the wrong formula."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    for norm, supported in ((LlamaRMSNorm(8), True), (Qwen2RMSNorm(8), True), (torch.nn.RMSNorm(8), True),
                            (GemmaRMSNorm(8), False)):
        model = torch.nn.Sequential(torch.nn.Embedding(10, 8), norm, torch.nn.Linear(8, 10))
        if supported:
            with InBatchAlignment(model) as tracker:
                assert [tap.kind for tap in tracker._taps] == ["embedding", "rms_norm", "linear"]
        else:
            with pytest.raises(ValueError, match=r"supported modules.*\['1.weight'\]"):
                InBatchAlignment(model)
