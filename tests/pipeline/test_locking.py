"""One writer per store (pipeline/locking.py): flock, the --no-lock lease, build-id fencing."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import time

import numpy as np
import pytest
from tile_store_helpers import smooth_regions, store_attrs

from pipeline import locking
from pipeline.locking import LockUnsupportedError, StoreLockedError, build_lock, current_build_id, read_writer
from pipeline.schema.errors import SlideWriteError
from pipeline.store_writer import create_store, write_slide


def test_flock_names_the_holder_and_is_released(tmp_path):
    with build_lock(tmp_path) as first:
        assert read_writer(tmp_path) == first and first.host == socket.gethostname() and first.pid == os.getpid()
        with pytest.raises(StoreLockedError, match=re.escape(f"pid {os.getpid()}, started {first.started}")):
            with build_lock(tmp_path):
                pass
        with pytest.raises(StoreLockedError):  # a lease writer is refused by a running flock build too
            with build_lock(tmp_path, use_flock=False):
                pass
    assert read_writer(tmp_path) is None
    with build_lock(tmp_path) as second:
        assert second.build_id != first.build_id


def test_no_flock_gives_a_clear_message(tmp_path, monkeypatch):
    import fcntl

    def unsupported(handle, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    with pytest.raises(LockUnsupportedError, match="does not support flock.*--no-lock"):
        with build_lock(tmp_path):
            pass
    with build_lock(tmp_path, use_flock=False) as lease:  # the explicit choice works without flock
        assert lease.mode == "lease" and current_build_id(tmp_path) == lease.build_id


def test_lease_is_exclusive_renewed_and_released(tmp_path):
    with build_lock(tmp_path, use_flock=False, lease_seconds=0.6) as first:
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            with build_lock(tmp_path, use_flock=False):
                pass
        with pytest.raises(StoreLockedError):  # a flock writer honours a live lease
            with build_lock(tmp_path):
                pass
        expires = json.loads((tmp_path / locking.LEASE_FILE).read_text())["expires"]
        time.sleep(0.5)  # longer than a third of the lease: the heartbeat renewed it
        assert json.loads((tmp_path / locking.LEASE_FILE).read_text())["expires"] > expires
        assert current_build_id(tmp_path) == first.build_id
    assert not (tmp_path / locking.LEASE_FILE).exists()


def test_a_stale_lease_is_taken_over(tmp_path):
    stale = locking.WriterInfo(host="gone", pid=1, started="2020-01-01T00:00:00+00:00", build_id="old",
                               mode="lease", expires=time.time() - 1)
    (tmp_path / locking.LEASE_FILE).write_text(stale.to_text())
    with build_lock(tmp_path, use_flock=False) as taken:
        assert current_build_id(tmp_path) == taken.build_id != "old"


def test_a_task_from_an_older_build_cannot_commit(tmp_path):
    create_store(tmp_path / "s.zarr", store_attrs("none"))
    store = tmp_path / "s.zarr"
    kwargs = dict(n_regions=1, coords=np.zeros((1, 2), int), origin=np.zeros((1, 2), int), foreground=np.ones(1),
                  attrs={"source_path": "x", "fingerprint": "f"})
    with build_lock(store) as old:
        pass
    with build_lock(store) as new:  # a restarted build holds the store now
        with pytest.raises(SlideWriteError, match="no longer holds"):
            write_slide(store, "a", regions=iter(smooth_regions(1)), build_id=old.build_id, **kwargs)
        assert sorted(p.name for p in (store / "slides").iterdir()) == ["zarr.json"]  # nothing left behind
        write_slide(store, "a", regions=iter(smooth_regions(1)), build_id=new.build_id, **kwargs)
    assert (store / "slides" / "a" / "zarr.json").exists()
