"""A worker's network is cut mid-trial: its trial goes stale, another worker resumes it, and when the
cut worker comes back its late result does not overwrite the newer one.

The cut worker runs in a network namespace of its own, joined to the host by a veth pair; the test
takes the host side of the pair down and up again. Needs root and iproute2 (`ip netns`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from helpers import synthetic_rows, write_csv
from pg_private import private_server
from search_helpers import points_finished, write_study
from vadsearch.storage import open_storage

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

HOST_IP, WORKER_IP = "10.231.7.1", "10.231.7.2"  # inside namespaces this test creates and removes


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def namespace():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 to make a network namespace")
    name, host_side = f"vs-{uuid.uuid4().hex[:6]}", f"vsh{uuid.uuid4().hex[:6]}"
    try:
        ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc.stderr.decode().strip()}")
    try:
        ip("link", "add", host_side, "type", "veth", "peer", "name", "vsw0", "netns", name)
        ip("addr", "add", f"{HOST_IP}/30", "dev", host_side)
        ip("link", "set", host_side, "up")
        ip("-n", name, "addr", "add", f"{WORKER_IP}/30", "dev", "vsw0")
        ip("-n", name, "link", "set", "vsw0", "up")
        ip("-n", name, "link", "set", "lo", "up")
        yield name, host_side
    finally:
        subprocess.run(["ip", "link", "del", host_side], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_cut_worker_is_replaced_and_cannot_clobber_the_result(tmp_path, namespace):
    ns, host_side = namespace
    server = private_server(listen=f"127.0.0.1,{HOST_IP}")
    try:
        server.stop()
        server.allow(f"{WORKER_IP}/32")
        server.start()
        corpus = write_csv(tmp_path / "corpus.csv", synthetic_rows(1500, 100, 100, seed=3))
        study_file = write_study(tmp_path / "cut.toml", name="cut", data=corpus, max_epochs=8,
                                 search="hidden_size = [16]")
        common = ["-m", "vadsearch.cli", "worker", str(study_file), "--device", "cpu", "-q",
                  "--heartbeat-interval", "1", "--grace-period", "3"]
        remote_url = server.url.replace("127.0.0.1", HOST_IP)
        cut = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *common, "--storage", remote_url],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while not any(tmp_path.glob("vadsearch-artifacts/*/*/epoch-0002.pt")):
            assert time.monotonic() < deadline and cut.poll() is None, cut.stdout.read() if cut.poll() else "slow"
            time.sleep(0.05)
        ip("link", "set", host_side, "down")  # the cut: packets vanish, nothing is refused

        rescuer = subprocess.run([sys.executable, *common, "--storage", server.url], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=300)
        assert rescuer.returncode == 0, rescuer.stdout + rescuer.stderr
        storage = open_storage(server.url)
        study = optuna.load_study(study_name="cut", storage=storage)
        winner = study.get_trials(states=(TrialState.COMPLETE,))
        assert len(winner) == 1 and winner[0].user_attrs["resumed_from"] >= 2

        ip("link", "set", host_side, "up")  # the cut worker comes back
        output = cut.communicate(timeout=300)[0]
        assert cut.returncode == 0, output
        assert "taken over" in output and "Traceback" not in output

        study = optuna.load_study(study_name="cut", storage=storage)
        assert study.trials[0].state == TrialState.FAIL  # failed as stale, never completed late
        assert points_finished(study) == {winner[0].user_attrs["point"]: 1}
        after = study.get_trials(states=(TrialState.COMPLETE,))[0]
        assert (after.number, after.value, after.user_attrs) == (winner[0].number, winner[0].value,
                                                                 winner[0].user_attrs)
    finally:
        server.close()
