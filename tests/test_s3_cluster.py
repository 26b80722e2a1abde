"""Analysis on a ``dask.distributed`` cluster of a store on S3 (moto's server on loopback): a
LocalCluster of 2 worker processes, started with no preload, its workers finding credentials in
their environment and none in the task graph, reads ``t.momentum[:, :100]``, xarray's dataset and
the streaming analyses bit for bit as this process does; an analysis takes ``client=`` or uses the
current client."""

import os
import pickle

import numpy as np
import pytest

pytest.importorskip("obstore")
distributed = pytest.importorskip("distributed")

from s3_rows import Rows  # noqa: E402
from s3_servers import SECRET_KEY, moto_server  # noqa: E402,F401

import wordystore  # noqa: E402
from wordystore import trajectory  # noqa: E402
from wordystore.analysis import measures  # noqa: E402


@pytest.fixture(scope="module")
def bucket_and_cluster(moto_server, tmp_path_factory):
    """A bucket holding a 40-row store, and a LocalCluster of 2 worker processes started with the
    server's AWS_* environment (as workers on a real cluster have their own)."""
    saved = dict(os.environ)  # the cluster sets OMP_NUM_THREADS=1 here too (tests/conftest.py)
    os.environ.update(moto_server.env(tmp_path_factory.mktemp("aws")))
    try:
        bucket = moto_server.new_bucket()
        rows = Rows()
        with wordystore.create(f"{bucket.url}/run.zarr", rows.kinds(), token_sets={"untrained": rows.untrained}) as w:
            rows.append(w, 0, 40)
        with distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster:
            yield bucket, cluster
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_a_cluster_reads_and_analyses_an_s3_store_as_this_process_does(bucket_and_cluster):
    bucket, cluster = bucket_and_cluster
    server = bucket.server
    options = {
        "endpoint": server.endpoint,
        "region": server.region,
        "access_key_id": server.access_key_id,
        "secret_access_key": server.secret_access_key,
        "client_options": {"allow_http": True},
    }
    t = trajectory.open(f"{bucket.url}/run.zarr", storage_options=options)
    expected = t.momentum.numpy((slice(None), slice(0, 100)))
    stats = measures.embedding_stats(t, "untrained")  # in this process: no client yet
    norms = measures.moment_norms(t, "untrained")

    momentum = t.momentum.to_dask()[:, :100]
    assert SECRET_KEY.encode() not in pickle.dumps(dict(momentum.__dask_graph__()))
    with distributed.Client(cluster) as client:
        assert momentum.compute().view(np.uint16).tobytes() == expected.view(np.uint16).tobytes()
        dataset = t.to_xarray(chunks={}, decode_bf16=False)  # the stored bfloat16, compared bit for bit
        assert np.array_equal(dataset.momentum[:, :100].values.view(np.uint16), expected.view(np.uint16))

        on_cluster = measures.embedding_stats(t, "untrained", client=client)
        with distributed.get_task_stream(client) as tasks:
            current = measures.moment_norms(t, "untrained")  # the current client, without being told
        assert any(task["key"].startswith("_squares-") for task in tasks.data)
    for name, column in stats.table.items():
        assert column.tobytes() == on_cluster.table[name].tobytes(), name
    assert np.array_equal(stats.freeze_step, on_cluster.freeze_step)
    assert np.array_equal(stats.hop_histogram, on_cluster.hop_histogram)
    assert all(norms[k].tobytes() == current[k].tobytes() for k in norms)
