"""The stream under MixtureLoader with workers (resumed from a saved checkpoint; torchdata's StatefulDataLoader over
the stream itself is refused), and under two real gloo ranks."""
from __future__ import annotations

import hashlib
import pickle
import socket

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from dgamix.mixer import ClusterStore, Mixture, MixtureLoader, MixtureStream

from .mixer_fixtures import synthetic_store

DOCS = [30, 20, 10, 25]



def gather_to_file(value, out, rank: int, world_size: int) -> None:
    """Every rank's `value`, pickled by rank 0 into `out` (what the spawning test reads back)."""
    gathered = [None] * world_size
    dist.all_gather_object(gathered, value)
    if rank == 0:
        with open(out, "wb") as fh:
            pickle.dump(gathered, fh)

def make_stream(directory, rank=0, world_size=1, max_steps=None):
    store = ClusterStore(directory, seed=1)
    mixture = Mixture(np.stack([np.r_[0.5, 0.5, 0, 0], np.r_[0.1, 0.2, 0.3, 0.4]]))
    return MixtureStream(store, mixture, seq_len=16, batch_size=4, seed=7, rank=rank, world_size=world_size,
                         max_steps=max_steps)


def digests(loader, n=None):
    out = []
    for batch in loader:
        out.append((batch["step"], hashlib.sha1(batch["tokens"].numpy().tobytes()).hexdigest()))
        if n is not None and len(out) == n:
            break
    return out


def test_loader_with_workers_resumes_exactly_from_a_checkpoint(tmp_path):
    import torch

    directory = synthetic_store(tmp_path / "tokens", DOCS)
    straight = digests(MixtureLoader(make_stream(directory, max_steps=14), num_workers=2))
    assert [s for s, _ in straight] == list(range(14))

    loader = MixtureLoader(make_stream(directory, max_steps=14), num_workers=2)
    first = digests(loader, n=5)  # steps 5..8 prefetched by the workers, never handed out
    torch.save(loader.stream_state(), tmp_path / "loader.pt")
    resumed = MixtureLoader(make_stream(directory, max_steps=14), num_workers=2)
    resumed.load_stream_state(torch.load(tmp_path / "loader.pt"))  # torch's defaults (weights_only)
    assert resumed.next_step == resumed.stream.step == 5
    assert first + digests(resumed) == straight


# (torch's DataLoader iterator fails half-built, after starting its workers; its __del__ then complains)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_stateful_dataloader_over_the_stream_itself_names_the_remedy(tmp_path):
    """Workers iterating copies of the stream would never see a weight change: torchdata's StatefulDataLoader over
    the stream is refused, naming MixtureLoader (whose own state_dict() resumes exactly, as above)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    stream = make_stream(synthetic_store(tmp_path / "tokens", DOCS), max_steps=14)
    with pytest.raises(TypeError, match="MixtureLoader"):
        digests(StatefulDataLoader(stream, batch_size=None, num_workers=2))
    assert stream.step == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, directory: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    stream = make_stream(directory, rank=dist.get_rank(), world_size=dist.get_world_size(), max_steps=10)
    mine = [(b["step"], rank, b["tokens"].numpy().tobytes()) for b in MixtureLoader(stream, num_workers=2)]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        import pickle

        with open(out, "wb") as fh:
            pickle.dump([item for part in gathered for item in part], fh)
    dist.destroy_process_group()


def test_two_gloo_ranks_with_two_workers_each(tmp_path):
    import pickle

    directory = synthetic_store(tmp_path / "tokens", DOCS)
    out = tmp_path / "gathered.pkl"
    mp.spawn(_rank_main, args=(2, free_port(), str(directory), str(out)), nprocs=2, join=True)
    gathered = pickle.loads(out.read_bytes())
    assert sorted((s, r) for s, r, _ in gathered) == [(s, r) for s in range(10) for r in range(2)]
    rows = {(s, r): np.frombuffer(t, dtype=np.int64).reshape(4, 17) for s, r, t in gathered}
    all_rows = np.concatenate([rows[(s, r)] for s in range(10) for r in range(2)])
    assert len({row.tobytes() for row in all_rows}) == len(all_rows)  # nothing produced twice

    store = ClusterStore(directory, seed=1)  # one process drawing the whole global batch of 8
    single = MixtureStream(store, make_stream(directory).mixture, seq_len=16, batch_size=8, seed=7)
    for step in range(10):
        np.testing.assert_array_equal(single.next_batch()["tokens"].numpy(),
                                      np.concatenate([rows[(step, 0)], rows[(step, 1)]]))


def _dga_rank_main(rank: int, world_size: int, port: int, directory: str, target_dir: str, out: str) -> None:
    import pickle

    import torch

    from dgamix.mixer import TargetSampler
    from dgamix.mixer.strategies import DGAStrategy

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.manual_seed(0)  # identical initial parameters on every rank, as DDP would broadcast
    model = torch.nn.Sequential(torch.nn.Embedding(64, 8), torch.nn.Linear(8, 64))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
    stream = make_stream(directory, rank=rank, world_size=world_size)

    aligned = []  # the sequences this rank's alignment differentiated

    def loss_fn(tokens):  # the alignment differentiates the bare module, not the DDP wrapper
        aligned.extend(row.numpy().tobytes() for row in tokens)
        return torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 64), tokens[:, 1:].reshape(-1))

    dga = DGAStrategy(stream, target=TargetSampler(ClusterStore(target_dir), 16), loss_fn=loss_fn,
                      params=list(model.parameters()), eta=2.0, beta=0.5, every=2, batch_size=4,
                      target_batch_size=4)  # the anchored rule splits each rank's 2 sequences of each in halves
    history, batches = [], []
    for step in range(6):
        tokens = stream.next_batch()["tokens"]
        batches.append(tokens.numpy().tobytes())
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(ddp(tokens[:, :-1]).reshape(-1, 64), tokens[:, 1:].reshape(-1)).backward()
        optimizer.step()
        dga.on_step(step)
        history.append(stream.weights.tolist())
    gathered = [None] * world_size
    dist.all_gather_object(gathered, {"history": history, "batches": batches, "aligned": aligned,
                                      "saved_weights": stream.state_dict()["weights"],
                                      "strategy_state": sorted(dga.state_dict())})
    if rank == 0:
        with open(out, "wb") as fh:
            pickle.dump(gathered, fh)
    dist.destroy_process_group()


def test_dga_weights_are_identical_on_two_gloo_ranks(tmp_path):
    import pickle

    directory = synthetic_store(tmp_path / "tokens", DOCS)
    target_dir = synthetic_store(tmp_path / "target", [12], seed=5)
    out = tmp_path / "dga.pkl"
    mp.spawn(_dga_rank_main, args=(2, free_port(), str(directory), str(target_dir), str(out)), nprocs=2, join=True)
    rank0, rank1 = pickle.loads(out.read_bytes())
    assert rank0["history"] == rank1["history"]  # bit-identical weights on both ranks
    assert rank0["history"][0] != rank0["history"][-1]  # and DGA did move them
    assert not set(rank0["batches"]) & set(rank1["batches"])  # while each rank trained on its own slice
    # and aligned on its own slice of the alignment batches: identical weights need the ranks' scores reduced
    assert rank0["aligned"] and not set(rank0["aligned"]) & set(rank1["aligned"])
    # the weights are saved with the stream's state, not the strategy's
    assert rank0["saved_weights"] == rank1["saved_weights"] == rank0["history"][-1]
    assert "weights" not in rank0["strategy_state"] and "updates" in rank0["strategy_state"]


def _inbatch_rank_main(rank: int, world_size: int, port: int, directory: str, target_dir: str, out: str) -> None:
    import pickle

    import torch

    from dgamix.mixer import TargetSampler
    from dgamix.mixer.inbatch import InBatchAlignment
    from dgamix.mixer.strategies import Evidence, InBatchDGAStrategy

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 8), torch.nn.Linear(8, 64))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
    stream = make_stream(directory, rank=rank, world_size=world_size)

    def sequence_losses(net, tokens):
        logits = net(tokens[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1),
                                                 reduction="none").view(len(tokens), -1).mean(dim=1)

    dga = InBatchDGAStrategy(stream, target=TargetSampler(ClusterStore(target_dir), 16),
                             tracker=InBatchAlignment(model), loss_fn=lambda t: sequence_losses(model, t).mean(),
                             eta=0.5, every=2, refresh=3, min_sequences=1,
                             target_batch_size=4)  # the anchored rule: each rank takes one sequence of each half
    history, local = [], 0
    for step in range(6):
        batch = stream.next_batch()
        optimizer.zero_grad()
        sequence_losses(ddp, batch["tokens"]).mean().backward()
        dga.observe(Evidence(batch))
        local += len(batch["cluster"])
        optimizer.step()
        dga.on_step(step)
        history.append(stream.weights.tolist())
    gather_to_file({"history": history, "local": local, "sequences": dga.stats.sequences, "decay": dga.decay},
                   out, rank, world_size)
    dist.destroy_process_group()


def test_in_batch_dga_scores_every_ranks_sequences_and_gives_identical_weights(tmp_path):
    import pickle

    directory = synthetic_store(tmp_path / "tokens", DOCS)
    target_dir = synthetic_store(tmp_path / "target", [12], seed=5)
    out = tmp_path / "inbatch.pkl"
    mp.spawn(_inbatch_rank_main, args=(2, free_port(), str(directory), str(target_dir), str(out)), nprocs=2,
             join=True)
    rank0, rank1 = pickle.loads(out.read_bytes())
    assert rank0["history"] == rank1["history"]  # bit-identical weights on both ranks
    assert rank0["history"][0] != rank0["history"][-1]
    # The statistics hold both ranks' sequences (3 updates of 2 steps x 4 sequences x 2 ranks, decayed after each
    # update), not one rank's: without the reduction they would hold half.
    decay = rank0["decay"]
    expected = sum(16 * decay ** k for k in range(1, 4))
    assert rank0["sequences"] == rank1["sequences"] == pytest.approx(expected)
    assert rank0["local"] == rank1["local"] == 24


# ---- in-batch DGA's target batch sharded across ranks ------------------------------------------------------------
# (rule, target sequences, low rank): 8 splits evenly (each half 2 + 2); 5 does not (halves of 2 and 3: 1 + 1 and
# 2 + 1); the paper rule with a low-rank target takes its factors from the reduced gradient.
INBATCH_TARGET_CONFIGS = [("anchored", 8, None), ("anchored", 5, None), ("paper", 8, 2)]


def _inbatch_target_runs(rank: int, world_size: int, directory: str, target_dir: str) -> list[dict]:
    """For each config, an in-batch DGA strategy on a fresh model (seed 0) and two target refreshes (the one at
    construction and one more): the rows its loss_fn received in each, g_spe and the gain after each, the target
    sampler's state, and the low-rank factors' product. world_size 1: one process, no process group."""
    import torch

    from dgamix.mixer import TargetSampler
    from dgamix.mixer.inbatch import InBatchAlignment
    from dgamix.mixer.strategies import InBatchDGAStrategy

    runs = []
    for rule, target_batch_size, low_rank in INBATCH_TARGET_CONFIGS:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(64, 8), torch.nn.Linear(8, 64))
        seen: list[bytes] = []

        def loss_fn(tokens):  # the bare module, as under DDP; records which target sequences it differentiates
            seen.extend(row.numpy().tobytes() for row in tokens)
            return torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 64),
                                                     tokens[:, 1:].reshape(-1))

        tracker = InBatchAlignment(model, rank=low_rank, low_rank_min_params=1)
        dga = InBatchDGAStrategy(make_stream(directory, rank=rank, world_size=world_size),
                                 target=TargetSampler(ClusterStore(target_dir), 16), tracker=tracker,
                                 loss_fn=loss_fn, rule=rule, target_batch_size=target_batch_size, min_sequences=1)
        refreshes = []
        for refresh in range(2):
            if refresh:
                seen.clear()
                dga.refresh_target()
            factors = {name: (us @ v.T).tolist() for name, (us, v) in tracker._factors.items()}
            refreshes.append({"seen": list(seen), "gradient": dga._target_gradient.tolist(), "gain": dga.gain,
                              "factors": factors, "target": dga.target.state_dict(),
                              "saved_target": dga.state_dict()["target"]})
        runs.append(refreshes)
    return runs


def _inbatch_target_rank_main(rank: int, world_size: int, port: int, directory: str, target_dir: str,
                              out: str) -> None:
    import pickle

    import torch

    from dgamix.mixer import TargetSampler
    from dgamix.mixer.inbatch import InBatchAlignment
    from dgamix.mixer.strategies import InBatchDGAStrategy

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    result = {"runs": _inbatch_target_runs(rank, world_size, directory, target_dir), "errors": []}
    # Too few target sequences for every rank to hold one (of each half, under the anchored rule): refused at
    # construction, before the sampler moves.
    for rule, target_batch_size in (("anchored", 3), ("paper", 1)):
        model = torch.nn.Sequential(torch.nn.Embedding(64, 8), torch.nn.Linear(8, 64))
        target = TargetSampler(ClusterStore(target_dir), 16)
        try:
            InBatchDGAStrategy(make_stream(directory, rank=rank, world_size=world_size), target=target,
                               tracker=InBatchAlignment(model), loss_fn=lambda t: model(t).sum(), rule=rule,
                               target_batch_size=target_batch_size)
            result["errors"].append((None, target.position))
        except ValueError as error:
            result["errors"].append((str(error), target.position))
    gather_to_file(result, out, rank, world_size)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def inbatch_target_sharded(tmp_path_factory):
    """One two-rank run (gloo) of `_inbatch_target_rank_main` and the same configs in this one process."""
    import pickle

    tmp_path = tmp_path_factory.mktemp("inbatch_target")
    directory = synthetic_store(tmp_path / "tokens", DOCS)
    target_dir = synthetic_store(tmp_path / "target", [12], seed=5)
    out = tmp_path / "inbatch_target.pkl"
    mp.spawn(_inbatch_target_rank_main, args=(2, free_port(), str(directory), str(target_dir), str(out)), nprocs=2,
             join=True)
    return pickle.loads(out.read_bytes()), _inbatch_target_runs(0, 1, str(directory), str(target_dir))


def test_in_batch_dga_shards_its_target_batch_across_two_gloo_ranks(inbatch_target_sharded):
    (rank0, rank1), single = inbatch_target_sharded
    for config, one, r0, r1 in zip(INBATCH_TARGET_CONFIGS, single, rank0["runs"], rank1["runs"]):
        rule, n, _ = config
        # Each rank's share of each half (anchored) or of the batch (paper), in sequences.
        halves = [n // 2, n - n // 2] if rule == "anchored" else [n]
        shares = [sum(-(-h // 2) for h in halves), sum(h // 2 for h in halves)]
        for refresh, (whole, a, b) in enumerate(zip(one, r0, r1)):
            where = (config, refresh)
            # Each rank differentiated only its share of the target sequences, together the one process's batch...
            assert [len(a["seen"]), len(b["seen"])] == shares, where
            assert len(whole["seen"]) == n and not set(a["seen"]) & set(b["seen"]), where
            assert sorted(a["seen"] + b["seen"]) == sorted(whole["seen"]), where
            # ...and both hold the same g_spe, gain and low-rank factors: the one process's, up to float rounding.
            for key in ("gradient", "factors") + (("gain",) if rule == "anchored" else ()):  # paper: no gain (NaN)
                assert a[key] == b[key], (where, key)
            g = np.asarray(whole["gradient"])
            assert np.abs(g).max() > 0, where
            np.testing.assert_allclose(a["gradient"], g, rtol=1e-5, atol=1e-6 * np.abs(g).max(), err_msg=str(where))
            if rule == "anchored":
                assert whole["gain"] != 0 and np.isfinite(whole["gain"]), where
                np.testing.assert_allclose(a["gain"], whole["gain"], rtol=1e-5, err_msg=str(where))
            assert sorted(a["factors"]) == sorted(whole["factors"]), where
            assert bool(whole["factors"]) == (config[2] is not None), where
            for name, product in whole["factors"].items():
                product = np.asarray(product)
                np.testing.assert_allclose(a["factors"][name], product, rtol=1e-4, atol=1e-5 * np.abs(product).max(),
                                           err_msg=str((where, name)))
            # Every rank planned the whole batch: the sampler's position, hence the checkpoint, is the one
            # process's on every rank.
            assert a["target"] == b["target"] == whole["target"], where
            assert a["saved_target"] == b["saved_target"] == whole["saved_target"], where


def test_in_batch_dga_refuses_a_target_batch_too_small_for_the_ranks(inbatch_target_sharded):
    (rank0, rank1), _ = inbatch_target_sharded
    for result in (rank0, rank1):
        (anchored, anchored_position), (paper, paper_position) = result["errors"]
        assert anchored is not None and "target_batch_size = 3" in anchored and "world size 2" in anchored \
            and "2 x the world size (4)" in anchored and "raise target_batch_size" in anchored, anchored
        assert paper is not None and "target_batch_size = 1" in paper and "world size 2" in paper \
            and ">= the world size (2)" in paper, paper
        assert anchored_position == paper_position == 0  # refused before any draw


# ---- the alignment draw sharded across ranks ---------------------------------------------------------------------
# (estimator, sequences per basis, target sequences): 4 and 2 split evenly over two ranks; 3 and 5 do not, so the
# ranks' shares differ (2 + 1, 3 + 2) and are weighted by their size.
SHARDED_CONFIGS = [("exact", 4, 2), ("exact", 3, 5), ("finite_difference", 3, 4), ("forward", 4, 3)]


def _alignment_runs(rank: int, world_size: int, directory: str, target_dir: str, configs: list,
                    fsdp: bool = False) -> list[dict]:
    """For each config, two DGA alignment draws on a fresh model (seed 0): the scores, the sequences this process
    differentiated, and the auxiliary sampler's state afterwards; for the exact estimator also one DoGE draw on
    another fresh model and stream: its scores and gradient norms. world_size 1: one process, no process group."""
    import torch

    from dgamix.mixer import TargetSampler
    from dgamix.mixer.strategies import DGAStrategy, DoGEStrategy

    def fresh_model():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(64, 8), torch.nn.Linear(8, 64))
        if fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world_size,))
            for layer in model:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model

    runs = []
    for estimator, batch_size, target_batch_size in configs:
        model = fresh_model()
        stream = make_stream(directory, rank=rank, world_size=world_size)
        target = TargetSampler(ClusterStore(target_dir), 16)
        seen: list[bytes] = []

        def loss_fn(tokens):
            try:
                seen.extend(row.numpy().tobytes() for row in tokens)
            except RuntimeError:  # inside torch.func.jvp (forward estimator) the batch is a storage-less wrapper
                pass
            return torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 64),
                                                     tokens[:, 1:].reshape(-1))

        dga = DGAStrategy(stream, target=target, loss_fn=loss_fn, params=list(model.parameters()),
                          estimator=estimator, batch_size=batch_size, target_batch_size=target_batch_size,
                          micro_batches=2, module=model, rule="paper")  # the scores alone: no rule's unit
        scores = [dga.alignment_scores().tolist() for _ in range(2)]
        state = stream.state_dict()
        runs.append({"scores": scores, "seen": seen, "aux_cursors": list(state["aux_cursors"]),
                     "aux_draws": state["aux_draws"], "target": target.state_dict()["position"]})
        if estimator == "exact":
            doge_model = fresh_model()
            doge = DoGEStrategy(make_stream(directory, rank=rank, world_size=world_size),
                                target=TargetSampler(ClusterStore(target_dir), 16),
                                loss_fn=lambda t: torch.nn.functional.cross_entropy(
                                    doge_model(t[:, :-1]).reshape(-1, 64), t[:, 1:].reshape(-1)),
                                params=list(doge_model.parameters()), lr_fn=lambda: 1e-3, batch_size=batch_size,
                                target_batch_size=target_batch_size, micro_batches=2)
            a, norms, target_norm = doge.alignment()
            runs[-1]["doge"] = [*a.tolist(), *norms.tolist(), target_norm]
    return runs


def _sharded_rank_main(rank: int, world_size: int, port: int, directory: str, target_dir: str, out: str,
                       configs: list, fsdp: bool) -> None:
    import pickle

    import torch

    from dgamix.mixer import TargetSampler
    from dgamix.mixer.strategies import DGAStrategy

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    result = {"runs": _alignment_runs(rank, world_size, directory, target_dir, configs, fsdp=fsdp)}
    if not fsdp:  # fewer sequences than ranks: refused, naming the settings
        model = torch.nn.Linear(4, 4)
        try:
            DGAStrategy(make_stream(directory, rank=rank, world_size=world_size),
                        target=TargetSampler(ClusterStore(target_dir), 16), loss_fn=lambda t: model.weight.sum(),
                        params=list(model.parameters()), batch_size=1, target_batch_size=4)
            result["error"] = None
        except ValueError as error:
            result["error"] = str(error)
    else:  # what cannot work on sharded parameters says so
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from dgamix.mixer.inbatch import InBatchAlignment

        model = fully_shard(torch.nn.Sequential(torch.nn.Linear(4, 4)), mesh=init_device_mesh("cpu", (world_size,)))
        errors = []
        for make in (lambda: InBatchAlignment(model),
                     lambda: DGAStrategy(make_stream(directory, rank=rank, world_size=world_size),
                                         target=TargetSampler(ClusterStore(target_dir), 16),
                                         loss_fn=lambda t: model(t[:, :4].float()).sum(),
                                         params=list(model.parameters()), estimator="finite_difference",
                                         batch_size=2, rule="paper").alignment_scores()):
            try:
                make()
                errors.append(None)
            except ValueError as error:
                errors.append(str(error))
        result["errors"] = errors
    gather_to_file(result, out, rank, world_size)
    dist.destroy_process_group()


def _check_sharded_against_one_process(tmp_path, configs: list, fsdp: bool) -> list[dict]:
    import pickle

    directory = synthetic_store(tmp_path / "tokens", DOCS)
    target_dir = synthetic_store(tmp_path / "target", [12], seed=5)
    out = tmp_path / "sharded.pkl"
    mp.spawn(_sharded_rank_main, args=(2, free_port(), str(directory), str(target_dir), str(out), configs, fsdp),
             nprocs=2, join=True)
    rank0, rank1 = pickle.loads(out.read_bytes())
    single = _alignment_runs(0, 1, str(directory), str(target_dir), configs)
    for config, one, r0, r1 in zip(configs, single, rank0["runs"], rank1["runs"]):
        # The ranks differentiated different sequences, together exactly the one process's...
        assert not set(r0["seen"]) & set(r1["seen"]), config
        assert sorted(r0["seen"] + r1["seen"]) == sorted(one["seen"]), config
        # ...and reached identical scores, the one process's up to float rounding (the ranks' partial scores are
        # summed: without the reduction each rank would hold its own slice's scores).
        assert r0["scores"] == r1["scores"], config
        # (finite differences divide the fp32 loss's rounding, which differs between a slice's mean and the whole
        # batch's, by 2 eps: their rounding is ~1e-4 relative)
        rtol = 2e-3 if config[0] == "finite_difference" else 1e-5
        np.testing.assert_allclose(r0["scores"], one["scores"], rtol=rtol, atol=1e-9, err_msg=str(config))
        assert np.ptp(one["scores"][0]) > 0, config
        # Every rank planned the whole draw: the auxiliary and target positions, hence the checkpoint, are the one
        # process's on every rank.
        for key in ("aux_cursors", "aux_draws", "target"):
            assert r0[key] == r1[key] == one[key], (config, key)
        if "doge" in one:  # DoGE's scores and gradient norms: the whole batches', as one process computes them
            assert r0["doge"] == r1["doge"], config
            np.testing.assert_allclose(r0["doge"], one["doge"], rtol=1e-5, atol=1e-9, err_msg=str(config))
    return [rank0, rank1]


def test_sharded_alignment_draw_gives_the_one_process_scores_on_two_gloo_ranks(tmp_path):
    rank0, rank1 = _check_sharded_against_one_process(tmp_path, SHARDED_CONFIGS, fsdp=False)
    for result in (rank0, rank1):
        assert result["error"] is not None and "batch_size = 1" in result["error"] \
            and "world size 2" in result["error"], result["error"]


def test_exact_scores_on_fully_sharded_parameters_equal_the_unsharded_scores(tmp_path):
    """FSDP2 (fully_shard) on two gloo ranks: every parameter a DTensor holding half its rows. The exact scores
    from the local shards, summed across ranks, are one unsharded process's, for even and uneven shares."""
    for result in _check_sharded_against_one_process(tmp_path, [("exact", 4, 2), ("exact", 3, 5)], fsdp=True):
        inbatch, finite_difference = result["errors"]
        assert inbatch is not None and "FSDP-sharded" in inbatch, inbatch
        assert finite_difference is not None and "estimator='exact'" in finite_difference, finite_difference
