"""Leases (bench.leases) on SQLite and PostgreSQL, with real processes: claimants racing for the same
units never both get one, and a claimant killed with -9 has its unit taken again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from support import PG_URL, pg_schema, postgres_unavailable_reason  # noqa: F401
import sqlalchemy as sa

from bench.leases import LeaseOwner, LeaseTimeout, claim_unit, hold_job, hold_unit, unit_resource
from bench.store import Store

#: A claimant on another machine: its pid means nothing here, so only the expiry frees its leases.
REMOTE = LeaseOwner("elsewhere", 4_000_000, "elsewhere/boot/ns")


@pytest.fixture(scope="session")
def postgres_unavailable() -> str | None:
    return postgres_unavailable_reason()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path, postgres_unavailable):
    """A fresh database: a SQLite file, or a private schema on the PostgreSQL server (dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'bench.db'}"
        return
    if postgres_unavailable:
        pytest.skip(postgres_unavailable)
    with pg_schema() as url:
        yield url


@pytest.fixture
def store(db_url):
    with Store.from_url(db_url) as store:
        store.create_all()
        yield store


def _claimant(db_url: str, script: str) -> subprocess.Popen:
    """A Python process running ``script`` with ``store`` open on ``db_url``."""
    code = "import sys, time\nfrom bench.store import Store\nfrom bench.leases import *\nstore = Store.from_url(sys.argv[1])\n" + textwrap.dedent(script)
    return subprocess.Popen([sys.executable, "-c", code, db_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_line(process: subprocess.Popen, expected: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.strip() == expected:
            return
        if not line and process.poll() is not None:
            raise AssertionError(f"claimant exited with {process.returncode}: {process.stderr.read()}")
    raise AssertionError(f"claimant did not print {expected!r} within {timeout_s} s")


def test_a_lease_is_exclusive_until_released(store: Store) -> None:
    lease = claim_unit(store, "run1", "fold-0")
    assert lease is not None
    assert claim_unit(store, "run1", "fold-0", owner=REMOTE) is None
    other = claim_unit(store, "run1", "fold-1", owner=REMOTE)
    assert other is not None  # another unit is free
    other.release()
    lease.release()
    assert store.get_lease(unit_resource("run1", "fold-0")) is None
    assert claim_unit(store, "run1", "fold-0", owner=REMOTE, heartbeat=False) is not None


def test_an_expired_lease_is_taken_over_and_its_old_holder_learns_it(store: Store) -> None:
    old = claim_unit(store, "run1", "fold-0", ttl_s=0.5, owner=REMOTE, heartbeat=False)
    assert old is not None and claim_unit(store, "run1", "fold-0", heartbeat=False) is None
    time.sleep(0.8)
    new = claim_unit(store, "run1", "fold-0", heartbeat=False)
    assert new is not None and store.get_lease(new.resource)["claims"] == 2
    assert not old.renew() and old.lost.is_set()
    old.release()  # a lost lease is not deleted: it is the new holder's
    assert store.get_lease(new.resource)["token"] == new.token


def test_the_heartbeat_keeps_a_lease_alive_beyond_its_ttl(store: Store) -> None:
    with hold_unit(store, "run1", "fold-0", ttl_s=0.9) as lease:
        time.sleep(2.0)
        assert claim_unit(store, "run1", "fold-0", owner=REMOTE) is None and not lease.lost.is_set()
    assert store.list_leases() == []


def test_waiting_for_a_held_unit_times_out_with_the_holder_named(store: Store) -> None:
    lease = claim_unit(store, "run1", "fold-0", owner=REMOTE)
    with pytest.raises(LeaseTimeout, match="held by elsewhere:4000000"):
        with hold_unit(store, "run1", "fold-0", wait_s=0.3, poll_s=0.1):
            pass
    lease.release()


def test_a_dead_holder_on_this_machine_is_replaced_at_once(store: Store) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid is free
    store.claim_lease(unit_resource("run1", "fold-0"), owner=f"here:{dead.pid}", node=LeaseOwner.current().node, pid=dead.pid, ttl_s=3600)
    started = time.monotonic()
    lease = claim_unit(store, "run1", "fold-0")
    assert lease is not None and time.monotonic() - started < 5
    lease.release()


@pytest.mark.parametrize("same_machine", [False, True], ids=["other-node", "this-node"])
def test_a_claimant_killed_with_9_has_its_unit_taken_again(store: Store, db_url: str, same_machine: bool) -> None:
    ttl_s = 2.0
    owner = "None" if same_machine else "LeaseOwner('elsewhere', 4_000_000, 'elsewhere/boot/ns')"
    victim = _claimant(db_url, f"""
        lease = claim_unit(store, "run1", "fold-0", ttl_s={ttl_s}, owner={owner})
        assert lease is not None
        print("claimed", flush=True)
        time.sleep(600)
        """)
    try:
        _wait_for_line(victim, "claimed")
        time.sleep(1.2 * ttl_s)  # past the ttl: only the heartbeat keeps it
        assert claim_unit(store, "run1", "fold-0", heartbeat=False) is None
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        killed = time.monotonic()
        while (lease := claim_unit(store, "run1", "fold-0", heartbeat=False)) is None:
            assert time.monotonic() - killed < ttl_s + 5, "the dead claimant's lease never expired"
            time.sleep(0.1)
        waited = time.monotonic() - killed
        assert store.get_lease(lease.resource)["claims"] == 2
        assert waited < 1.0 if same_machine else waited > ttl_s / 4
    finally:
        victim.kill()
        victim.wait()


def test_claimants_racing_for_the_same_units_never_both_get_one(store: Store, db_url: str, tmp_path: Path) -> None:
    units = 40
    start_at = time.time() + 4.0  # both processes are up and connected before the race starts
    # Both stay alive until both have finished: a claimant that exits first leaves leases of a dead pid on
    # this machine, which the other may rightly take over (that is the crash recovery, not a double claim).
    barrier = tmp_path / "finished"
    barrier.mkdir()
    script = f"""
        import os, pathlib
        claimed = []
        time.sleep(max(0.0, {start_at} - time.time()))
        for fold in range({units}):
            if claim_unit(store, "run1", f"fold-{{fold}}", ttl_s=600, heartbeat=False) is not None:
                claimed.append(fold)
        print(" ".join(map(str, claimed)), flush=True)
        pathlib.Path({str(barrier)!r}, str(os.getpid())).touch()
        deadline = time.time() + 60
        while len(os.listdir({str(barrier)!r})) < 2 and time.time() < deadline:
            time.sleep(0.05)
        """
    racers = [_claimant(db_url, script) for _ in range(2)]
    outputs = []
    for racer in racers:
        out, err = racer.communicate(timeout=120)
        assert racer.returncode == 0, err
        outputs.append({int(fold) for fold in out.split()})
    assert not outputs[0] & outputs[1]
    assert outputs[0] | outputs[1] == set(range(units))
    assert len(store.list_leases("unit:run1:")) == units


def test_a_job_whose_worker_died_is_queued_again_and_a_live_one_is_not(store: Store) -> None:
    dead_job = store.enqueue_job({"submission": "a"})
    live_job = store.enqueue_job({"submission": "b"})
    assert store.claim_job("w1").id == dead_job and store.claim_job("w2").id == live_job
    with hold_job(store, live_job):
        assert store.requeue_stale_jobs(grace_s=0) == [dead_job]
    assert store.get_job(dead_job).status == "queued" and store.get_job(live_job).status == "running"
    assert store.requeue_stale_jobs(grace_s=3600) == []  # a job that just started is left alone
