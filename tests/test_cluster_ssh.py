"""`deepspeed --hostfile` across two hosts through DeepSpeed's pdsh runner, over real ssh.

The two hosts are this machine under two names on two loopback addresses (simmtm-node1 =
127.0.0.2, simmtm-node2 = 127.0.0.3, in /etc/hosts while the module runs), each reached through an
sshd started by the test with its own host and user keys (root only; Debian's openssh-server and
pdsh). The launch is the README's multi-node command: no --no_ssh_check, no localhost shortcut;
DeepSpeed checks ssh to the first host, then `pdsh -S -f 1024 -w simmtm-node1,simmtm-node2` starts
one launcher per host, which starts that host's rank (slots=1).

- both ranks train together: rank 0 in the session to 127.0.0.2, rank 1 in the one to 127.0.0.3,
  both rendezvous at MASTER_ADDR simmtm-node1; neither maps DeepSpeed's CPU shared-memory segment
  (it is used only when all ranks are on one host: LOCAL_SIZE == WORLD_SIZE), so two "hosts" on one
  machine share nothing but loopback TCP; both find the venv's ninja though sshd's PATH lacks it;
- SIGKILL of the rank on the second host ends the whole launch (its peer fails in the next
  collective), and the same command with ckpt.resume=auto continues from the last complete
  checkpoint; losses and final parameters equal the uninterrupted launch's, bitwise.
"""
import json
import os
import signal
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

from trainer.config import REPO_ROOT
from trainer.distributed import SHM_DIR, shm_segment_name

from .cluster_utils import (ETC_HOSTS, HOOKS, HOSTS, SshHosts, install, read_reports, skip_module_unless,
                            serve, versions, wait_for)
from .launch_utils import VENV_BIN, deepspeed_cmd, free_port, summary

skip_module_unless("ssh")  # one printed reason where root or the Debian packages are missing
pytestmark = pytest.mark.slow

STEPS, EVERY = 8, 2
TIMEOUT = 420
FIRST, SECOND = f"step_{EVERY:08d}", f"step_{2 * EVERY:08d}"


@pytest.fixture(scope="module")
def hosts(request, tmp_path_factory):
    install("ssh")
    h = SshHosts(tmp_path_factory.mktemp("ssh"))

    def etc_hosts_restored() -> None:
        assert h.daemons.token not in ETC_HOSTS.read_text()  # its /etc/hosts lines are gone

    yield from serve(request, h, "the ssh hosts",
                     lambda s: f"ssh cluster tests: sshd on {', '.join(f'{n}={a}' for n, a in HOSTS.items())} "
                               f"({versions(['ssh', '-V'], ['pdsh', '-V'])}, DeepSpeed {version('deepspeed')})",
                     "ssh cluster tests: sshd and every session stopped (none left in ps), /etc/hosts restored",
                     etc_hosts_restored)


@pytest.fixture(autouse=True)
def no_sessions_left(hosts):
    yield
    hosts.end_sessions()


def launch(hosts, out: Path, run: Path, *extra, hold_in=None, hold_ranks="", port=None) -> subprocess.Popen:
    """The README's multi-node command with a hostfile naming both hosts. Variables reach the other
    host's shell as DeepSpeed documents: through a .deepspeed_env file (DS_ENV_FILE names ours)."""
    out.mkdir(parents=True, exist_ok=True)
    hostfile = out / "hostfile"
    hostfile.write_text("".join(f"{name} slots=1\n" for name in HOSTS))
    remote = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions")),
              "OMP_NUM_THREADS": "1"}
    env = hosts.env(DS_ENV_FILE=str(out / "deepspeed_env"))
    if hold_in:
        (out / "hold").mkdir(exist_ok=True)
        remote.update(SIMMTM_TEST_HOLD_SAVE=hold_in, SIMMTM_TEST_HOLD_DIR=str(out / "hold"),
                      SIMMTM_TEST_HOLD_RANKS=hold_ranks)
        env["PYTHONPATH"] = str(HOOKS)  # the runner exports PYTHONPATH to every host itself
    (out / "deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in remote.items()))
    cmd = deepspeed_cmd("--hostfile", str(hostfile), "--master_addr", "simmtm-node1",
                        "--master_port", str(port or free_port()),
                        script_args=["dist.deepspeed=true", f"train.max_steps={STEPS}", f"ckpt.every={EVERY}",
                                     "ckpt.keep=3", "log.tensorboard=false", f"ckpt.dir={run}", *extra])
    log = open(out / "launch.log", "ab")
    try:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        log.close()


def finish(proc: subprocess.Popen, out: Path, expect_ok=True) -> str:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"launch did not end in {TIMEOUT} s:\n{(out / 'launch.log').read_text()[-4000:]}")
    log = (out / "launch.log").read_text()
    if expect_ok:
        assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{log[-4000:]}"
    return log


def reports(folder: Path, ranks):
    def ready():
        try:
            got = read_reports(folder)
        except json.JSONDecodeError:  # being written
            return None
        return got if set(ranks) <= set(got) else None
    return ready


def losses(s):
    return [(h["step"], h["loss"], h["loss_rec"], h["loss_cl"]) for h in s["history"]]


@pytest.fixture(scope="module")
def straight(hosts, tmp_path_factory):
    """An uninterrupted two-host launch; each rank reports (without stopping) where it runs."""
    out = tmp_path_factory.mktemp("straight")
    port = free_port()
    log = finish(launch(hosts, out, out / "run", hold_in=FIRST, port=port), out)
    return {"out": out, "run": out / "run", "log": log, "port": port}


def test_two_hosts_over_ssh_train_together(straight):
    log, out = straight["log"], straight["out"]
    assert "pdsh -S -f 1024 -w simmtm-node1,simmtm-node2" in log  # DeepSpeed's multi-node (pdsh) runner
    assert "2 rank(s) [deepspeed] on cpu" in log and "replicas identical   True (2 rank(s))" in log
    s = summary(straight["run"])
    assert s["steps"] == STEPS and s["world_size"] == 2
    where = read_reports(out / "hold")
    for rank, address in enumerate(HOSTS.values()):
        server_ip = where[rank]["ssh_connection"].split()[2]  # "client ip, client port, server ip, server port"
        assert server_ip == address, (rank, where[rank])  # rank r runs on host r
        assert where[rank]["master_addr"] == "simmtm-node1"
        assert not where[rank]["shm_mapped"], where[rank]  # no shared memory between the two "hosts"
        # sshd's PATH lacks the venv; the rank still runs the venv's ninja (trainer/distributed.py), so
        # the cached DeepSpeed op is neither rebuilt by another ninja version nor missing a ninja
        assert where[rank]["ninja"] == str(VENV_BIN / "ninja"), where[rank]
    assert not list(Path(SHM_DIR).glob(shm_segment_name("*", "*", straight["port"])))


def test_rank_on_second_host_killed_then_resume_is_exact(hosts, straight, tmp_path):
    out, run = tmp_path / "killed", tmp_path / "run"
    proc = launch(hosts, out, run, hold_in=SECOND, hold_ranks="1")
    got = wait_for(f"rank 1 held in the save of {SECOND}", reports(out / "hold", [1]), TIMEOUT,
                   alive=lambda: proc.poll() is None or pytest.fail(
                       f"launch ended early:\n{(out / 'launch.log').read_text()[-4000:]}"))
    assert (run / "checkpoints" / "latest").read_text().strip() == FIRST
    assert got[1]["ssh_connection"].split()[2] == HOSTS["simmtm-node2"]
    os.kill(got[1]["pid"], signal.SIGKILL)  # the rank on simmtm-node2 dies
    log = finish(proc, out, expect_ok=False)
    assert proc.returncode != 0, log[-3000:]
    wait_for("the launch to end on both hosts", lambda: not hosts.sessions(), 30)  # launchers, ranks, sessions
    assert not (run / "summary.json").exists()

    # The same command again, resuming: no hold this time.
    again = tmp_path / "resumed"
    log = finish(launch(hosts, again, run, "ckpt.resume=auto"), again)
    assert f"resumed from {FIRST} at step {EVERY}" in log
    resumed, reference = summary(run), summary(straight["run"])
    assert losses(resumed) == losses(reference)  # every step's losses, bitwise
    assert resumed["parameter_digests"] == reference["parameter_digests"]
