"""pm-embed under torchrun: 2 gloo ranks on CPU shard the slides and write the same folder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from trainer.eval.embed import EmbedConfig, embed_store
from trainer.eval.embeddings_format import open_embeddings

REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path, eval_store, supervised_ckpt) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "trainer.eval.cli", "embed", "--checkpoint", str(supervised_ckpt),
               "--store", str(eval_store), "--out", str(out), "--no-baseline", "--device", "cpu", "--no-progress"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("embedded 7 slides") == 1 and "(4 on this rank now" in done.stdout  # rank 0: slides 0, 2, 4, 6
    sharded = open_embeddings(out)
    single = tmp_path / "single"
    embed_store(str(supervised_ckpt), str(eval_store), single, EmbedConfig(baseline=False, progress=False))
    reference = open_embeddings(single)
    assert sharded.table["slide_id"].tolist() == reference.table["slide_id"].tolist()
    np.testing.assert_allclose(sharded.slide_features("checkpoint", "cls"),
                               reference.slide_features("checkpoint", "cls"), rtol=1e-5, atol=1e-6)
