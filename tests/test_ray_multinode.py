"""Ray Train across nodes: a 2-node Ray cluster on this machine (one CPU per node), driven through
``scoretune train --workers 2 --address <head>``. The shared local Ray is shut down first and the
cluster is torn down afterwards (the ``ray_local`` fixture restarts its Ray when a later test needs it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scoretune.config import build_config


@pytest.fixture
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the GCS of the head picks a free port: no clash with other local Rays
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_two_workers_train_on_two_nodes(two_node_cluster, tmp_path, capsys):
    from trainables.ray_checkpoint import latest_checkpoint_dir, read_history, read_workers
    from scoretune.drivers.train import train

    cfg = build_config({
        "name": "two-nodes", "data": {"name": "digits", "val_size": 0.25},
        "attack": {"eps": 0.2, "steps": 2}, "eval": {"pgd_steps": 2, "max_samples": 64, "test": False},
        "optim": {"lr": 0.2}, "epochs": 2, "batch_size": 64, "device": "cpu",
        "scaling": {"storage_path": str(tmp_path / "ray_results")},
    })
    summary = train(cfg, workers=2, address=two_node_cluster.address, use_mlflow=False)
    assert summary["epochs"] == 2
    assert "trained on 2 worker(s) on 2 node(s)" in capsys.readouterr().out

    found = latest_checkpoint_dir(str(tmp_path / "ray_results"), "two-nodes")
    assert found is not None and Path(found[1]).name == "epoch_0002"
    workers = read_workers(*found)
    cluster_nodes = {node.node_id for node in two_node_cluster.list_all_nodes()}
    assert [w["rank"] for w in workers] == [0, 1]
    assert len({w["node_id"] for w in workers}) == 2
    assert {w["node_id"] for w in workers} == cluster_nodes
    assert [r["epoch"] for r in read_history(*found)] == [1.0, 2.0]
