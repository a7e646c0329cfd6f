"""Spherical and hierarchical k-means: known answers, determinism, backends agree, bad levels."""
from __future__ import annotations

import numpy as np
import pytest

from dgamix.pipeline.cluster import validate_levels
from dgamix.pipeline.kmeans import HierarchicalKMeans, _repair_empty, l2_normalize, nearest_centroid, spherical_kmeans
from dgamix.core.errors import ParamError


def planted(n_per: int = 60, k: int = 6, dim: int = 24, seed: int = 0):
    """k tight, well-separated directions on the sphere, n_per points each."""
    rng = np.random.default_rng(seed)
    centers = l2_normalize(rng.normal(size=(k, dim)))
    x = np.repeat(centers, n_per, axis=0) + 0.05 * rng.normal(size=(k * n_per, dim))
    return l2_normalize(x), np.repeat(np.arange(k), n_per)


def test_spherical_kmeans_recovers_planted_clusters():
    x, truth = planted()
    centroids, labels = spherical_kmeans(x, 6, iterations=30, seed=3)
    # Each found cluster is exactly one planted cluster (a permutation of labels).
    pairs = set(zip(labels.tolist(), truth.tolist()))
    assert len(pairs) == 6
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)


def test_spherical_kmeans_is_deterministic_for_a_seed():
    x, _ = planted(seed=1)
    a = spherical_kmeans(x, 8, seed=5)
    b = spherical_kmeans(x, 8, seed=5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_no_cluster_is_left_empty():
    x, _ = planted(n_per=3, k=2)  # 6 points, 5 clusters: several inits collide
    _, labels = spherical_kmeans(x, 5, seed=0)
    assert np.bincount(labels, minlength=5).min() >= 1


def test_torch_backend_matches_faiss():
    x, _ = planted(n_per=80, k=10, dim=32, seed=2)
    faiss_model = HierarchicalKMeans([4, 3], seed=7, backend="faiss").fit(x)
    torch_model = HierarchicalKMeans([4, 3], seed=7, backend="torch").fit(x)
    ids_f, sims_f = faiss_model.predict(x)
    ids_t, sims_t = torch_model.predict(x)
    assert (ids_f == ids_t).mean() >= 0.99  # equal up to floating-point ties
    np.testing.assert_allclose(sims_f, sims_t, atol=1e-4)
    for cf, ct in zip(faiss_model.centroids_, torch_model.centroids_):
        np.testing.assert_allclose(cf, ct, atol=1e-4)


def test_nearest_centroid_backends_agree():
    rng = np.random.default_rng(0)
    x, c = l2_normalize(rng.normal(size=(500, 16))), l2_normalize(rng.normal(size=(20, 16)))
    brute = np.argmax(x @ c.T, axis=1)
    for backend in ("faiss", "torch"):
        idx, sims = nearest_centroid(x, c, backend)
        np.testing.assert_array_equal(idx, brute)
        np.testing.assert_allclose(sims, (x @ c.T).max(axis=1), atol=1e-5)


def test_hierarchy_is_consistent():
    x, _ = planted(n_per=40, k=8, dim=16)
    model = HierarchicalKMeans([4, 5], seed=0).fit(x)
    ids, sims = model.predict(x)
    assert ids.shape == (len(x), 2)
    np.testing.assert_array_equal(ids[:, 1] // 5, ids[:, 0])  # fine id encodes its parent
    assert model.valid_[1][ids[:, 1]].all()  # only used clusters are ever assigned
    table = model.parent_table()
    fine = table["level"] == 1
    np.testing.assert_array_equal(table["parent"][fine], np.arange(20) // 5)
    np.testing.assert_allclose(sims, np.einsum("ij,ij->i", x, model.centroids_[1][ids[:, 1]]), atol=1e-5)


def test_parent_with_fewer_points_than_children_leaves_empty_ids():
    big, _ = planted(n_per=8, k=1, dim=8, seed=0)
    small, _ = planted(n_per=2, k=1, dim=8, seed=1)
    x = np.concatenate([big, small])  # 10 points for 8 clusters, but one coarse cluster holds only 2
    model = HierarchicalKMeans([2, 4], seed=0).fit(x)
    assert model.valid_[1].sum() == 6  # 4 children for the big parent, 2 for the small one
    ids, _ = model.predict(x)
    assert len(np.unique(ids[:, 1])) == 6
    assert model.valid_[1][ids[:, 1]].all()


def test_fit_is_deterministic_and_seed_matters():
    x, _ = planted(n_per=50, k=12, dim=16, seed=4)
    a = HierarchicalKMeans([4, 4], seed=1).fit(x).predict(x)[0]
    b = HierarchicalKMeans([4, 4], seed=1).fit(x).predict(x)[0]
    c = HierarchicalKMeans([4, 4], seed=2).fit(x).predict(x)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("levels", [[], [0], [4, -1], "16", [2.5], [True]])
def test_bad_levels_name_the_parameter(levels):
    with pytest.raises(ParamError, match=r"cluster.levels = .*expected a non-empty list of positive integers"):
        validate_levels(levels, 1000)


def test_more_clusters_than_documents_is_an_error():
    with pytest.raises(ParamError, match=r"cluster.levels = \[64, 64\] asks for 4096 fine clusters but the corpus "
                                         r"has only 300 documents"):
        validate_levels([64, 64], 300)


def test_repair_fills_every_empty_cluster_without_emptying_another():
    labels = np.array([0, 1, 1, 1])
    sims = np.array([0.1, 0.9, 0.8, 0.95])  # the worst-served point is alone in cluster 0: it must stay
    repaired = _repair_empty(labels, sims, 4)
    assert np.bincount(repaired, minlength=4).min() == 1
    assert repaired[0] == 0
