"""Real cluster software for the launch tests: a one-host Slurm cluster (munge, slurmctld, slurmd)
and two ssh "hosts" on loopback addresses for DeepSpeed's pdsh runner.

Why a module of its own: both are daemons that a test must always stop, even when it fails, and
the stopping is the same for both. Every process a test starts (daemons, jobs, ssh sessions, the
ranks they start) carries one environment variable with a token unique to the fixture; after the
graceful stop any process still carrying it is killed, and `ps` must then list none.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import pytest

from trainer.config import REPO_ROOT

from .launch_utils import clean_env, free_port

MARK = "SIMMTM_CLUSTER_TEST"  # carried by every process a cluster fixture starts
HOOKS = REPO_ROOT / "tests" / "cluster_hooks"  # sitecustomize.py: holds a rank inside a checkpoint write
DEPS = REPO_ROOT / "scripts" / "cluster_test_deps.sh"
TOOLS = {"slurm": ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "ps"),
         "ssh": ("sshd", "ssh", "ssh-keygen", "pdsh", "ps")}
NEEDS_ROOT = {"slurm": "start munged, slurmctld and slurmd as root",
              "ssh": "start sshd on two loopback addresses and add them to /etc/hosts"}
PACKAGES = {"slurm": ("munge", "slurmctld", "slurmd", "slurm-client", "procps"),
            "ssh": ("openssh-server", "openssh-client", "pdsh", "procps")}
_SBIN = ("/usr/sbin", "/sbin")


def which(tool: str) -> Optional[str]:
    return shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), *_SBIN]))


def why_not(kind: str) -> Optional[str]:
    """Why the `kind` cluster cannot run here, or None; cheap and without side effects (it runs
    when the test module is imported). Missing packages are not a reason as root with apt-get:
    `install` gets them."""
    if not sys.platform.startswith("linux"):
        return f"needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"needs root to {NEEDS_ROOT[kind]} (running as uid {os.geteuid()})"
    missing = [t for t in TOOLS[kind] if not which(t)]
    if missing and not which("apt-get"):
        return f"{', '.join(missing)} not installed, and no apt-get to install {' '.join(PACKAGES[kind])}"
    return None


def skip_module_unless(kind: str) -> None:
    """At a test module's import: skip it, with one printed reason, unless the cluster can run here.
    SIMMTM_CLUSTER_TESTS=required (set by .ci/run) makes that a collection error instead."""
    reason = why_not(kind)
    if reason is None:
        return
    reason = f"{kind} cluster tests: {reason}"
    if os.environ.get("SIMMTM_CLUSTER_TESTS") == "required":
        pytest.fail(f"{reason} (SIMMTM_CLUSTER_TESTS=required)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def install(kind: str) -> None:
    """Install missing Debian packages (scripts/cluster_test_deps.sh); fails the test naming why not."""
    if all(which(t) for t in TOOLS[kind]):
        return
    proc = subprocess.run(["bash", str(DEPS)], capture_output=True, text=True)
    missing = [t for t in TOOLS[kind] if not which(t)]
    if proc.returncode != 0 or missing:
        pytest.fail(f"{kind} cluster tests: installing {' '.join(PACKAGES[kind])} failed: "
                    f"{proc.stderr.strip()[-2000:] or ', '.join(missing) + ' still missing'}", pytrace=False)


def announce(request, line: str) -> None:
    """A line in pytest's output whatever its capture and -q flags (CI logs show the clusters ran)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write(f"\n{line}\n")  # on a line of its own, after any progress dots


def serve(request, cluster, what: str, started, stopped: str, after_stop=None):
    """A module fixture's body: start `cluster`, announce `started(seconds it took)`, yield it; then
    stop it, fail if any of its processes is left (or `after_stop` finds something left), announce
    `stopped`. Use as `yield from serve(...)`."""
    try:
        start = time.time()
        cluster.start()
        announce(request, started(time.time() - start))
        yield cluster
    finally:
        left = cluster.stop()
        assert not left, f"processes left behind by {what}: {left}"
        if after_stop is not None:
            after_stop()
        announce(request, stopped)


def versions(*commands) -> str:
    """First line of each `tool --version`-like command's output, e.g. 'slurm-wlm 22.05.8'."""
    out = []
    for cmd in commands:
        proc = subprocess.run([which(cmd[0]) or cmd[0], *cmd[1:]], capture_output=True, text=True)
        text = (proc.stdout or proc.stderr).strip()
        out.append(text.splitlines()[0] if text else f"{cmd[0]} ?")
    return ", ".join(out)


def marked_processes(token: str, root: Optional[Path] = None) -> list[tuple[int, str]]:
    """(pid, command line) of every live process (per `ps`) whose environment carries the token, or
    (slurmstepd, which blanks its environment for its process title) with a file open under `root`."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,stat=,args="], capture_output=True, text=True).stdout
    needle = f"{MARK}={token}".encode()
    found = []
    for line in out.splitlines():
        pid, stat, *args = line.split(None, 2)
        if stat.startswith("Z") or int(pid) == os.getpid():
            continue
        try:
            ours = needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if not ours and root is not None:
                fds = Path(f"/proc/{pid}/fd")
                ours = any(os.readlink(fd).startswith(f"{root}/") for fd in fds.iterdir())
        except OSError:  # gone meanwhile
            continue
        if ours:
            found.append((int(pid), args[0] if args else ""))
    return found


class Daemons:
    """Processes one fixture starts, stopped in reverse order; `stop` then kills whatever still
    carries the fixture's token and returns what `ps` shows afterwards (an empty list)."""

    def __init__(self, root: Path):
        self.root = root
        self.token = f"{root.name}-{uuid.uuid4().hex[:8]}"
        self.procs: list[tuple[str, subprocess.Popen]] = []
        (root / "log").mkdir(parents=True, exist_ok=True)

    def env(self, **extra) -> dict:
        return clean_env(**{MARK: self.token}, **extra)

    def start(self, name: str, cmd: list, env: dict) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.out", "ab")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}): "
                                   f"{(self.root / 'log' / f'{name}.out').read_text()[-3000:]}")

    def stop(self) -> list[tuple[int, str]]:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for _ in range(50):
            left = marked_processes(self.token, self.root)
            if not left:
                return []
            for pid, _ in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        return marked_processes(self.token, self.root)


def wait_for(what: str, check, timeout: float, interval: float = 0.05, alive=None):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if alive is not None:
            alive()
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


ETC_HOSTS = Path("/etc/hosts")
HOSTS_TAG = "# simmtm cluster test"


def edit_etc_hosts(token: str, add: list[tuple[str, str]]) -> None:
    """Drop the /etc/hosts lines a fixture with this token added, then add `add` ((address, name)
    pairs), tagged with it. In place, not by rename: /etc/hosts is often a bind mount."""
    tag = f"{HOSTS_TAG} {token}"
    with open(ETC_HOSTS, "r+") as f:
        lines = [line for line in f.read().splitlines() if not line.endswith(tag)]
        f.seek(0)
        f.write("\n".join(lines + [f"{a} {n}  {tag}" for a, n in add]) + "\n")
        f.truncate()


def resolves(name: str) -> bool:
    try:
        socket.getaddrinfo(name, None)
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------- Slurm

class SlurmCluster:
    """One node (this machine, by its hostname) running munged, slurmctld and slurmd as root, with
    configuration, keys, state, spool and logs under `root`. No accounting database: slurmdbd needs
    MariaDB, so `sacct` is unavailable; a job's end state and exit code come from `scontrol show job`
    and from the job-completion log (jobcomp/filetxt)."""

    def __init__(self, root: Path):
        self.root = root
        self.daemons = Daemons(root)
        self.conf = root / "slurm.conf"
        self.jobcomp = root / "log" / "jobcomp.txt"
        self.node = socket.gethostname()
        self.added_host = False

    def write_config(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool"):
            (r / d).mkdir(mode=0o700, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (r / "plugstack.conf").write_text("")
        cpus = max(2, os.cpu_count() or 1)
        self.conf.write_text(f"""\
ClusterName=simmtmtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
PlugStackConfig={r}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
KillWait=5
MinJobAge=3600
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def env(self, **extra) -> dict:
        env = self.daemons.env(SLURM_CONF=str(self.conf), **extra)
        env["PATH"] = os.pathsep.join([env["PATH"], *_SBIN])
        return env

    def start(self, timeout: float = 60) -> None:
        if not resolves(self.node):  # the batch script's MASTER_ADDR is the node's name, as on a real cluster
            edit_etc_hosts(self.daemons.token, [("127.0.0.1", self.node)])
            self.added_host = True
        self.write_config()
        r, env = self.root, self.env()
        sock = r / "munge" / "munge.socket"
        self.daemons.start("munged", [which("munged"), "--foreground", "--force", f"--key-file={r}/munge/munge.key",
                                      f"--socket={sock}", f"--pid-file={r}/munge/munged.pid",
                                      f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/seed"], env)
        wait_for("munged's socket", sock.exists, timeout, alive=self.daemons.check_alive)
        self.daemons.start("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)], env)
        self.daemons.start("slurmd", [which("slurmd"), "-D", "-f", str(self.conf)], env)
        wait_for(f"node {self.node} idle in sinfo",
                 lambda: self.cmd("sinfo", "-h", "-o", "%T", check=False).strip() == "idle", timeout,
                 interval=0.5, alive=self.daemons.check_alive)

    def cancel_all(self) -> None:
        """Cancel every job and wait (up to 30 s) until none is left, so the next test has the node."""
        if not any(name == "slurmctld" and p.poll() is None for name, p in self.daemons.procs):
            return
        jobs = self.cmd("squeue", "-h", "-o", "%A", check=False).split()
        if jobs:
            self.cmd("scancel", *jobs, check=False)
            try:
                wait_for("cancelled jobs to end", lambda: not self.cmd("squeue", "-h", check=False).strip(), 30,
                         interval=0.5)
            except TimeoutError:
                pass  # stop() kills what is left

    def stop(self) -> list[tuple[int, str]]:
        self.cancel_all()
        try:
            return self.daemons.stop()
        finally:
            if self.added_host:
                edit_etc_hosts(self.daemons.token, [])

    def cmd(self, *args, check: bool = True, timeout: float = 60) -> str:
        proc = subprocess.run(list(args), env=self.env(), cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def sbatch(self, *args, env: Optional[dict] = None) -> int:
        """Submit from the repository root, as a user would; returns the job id."""
        proc = subprocess.run(["sbatch", "--parsable", *args], env=env or self.env(), cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, jobid: int) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, Reason, ...)."""
        return dict(re.findall(r"(\w+)=(\S*)", self.cmd("scontrol", "show", "job", "-o", str(jobid))))

    def completion(self, jobid: int) -> dict:
        """The job-completion log's record of the job's end (jobcomp/filetxt), the last if several."""
        records = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in self.jobcomp.read_text().splitlines()]
        return [rec for rec in records if rec.get("JobId") == str(jobid)][-1]

    def wait_state(self, jobid: int, states: tuple, timeout: float) -> dict:
        def reached():
            job = self.job(jobid)
            return job if job.get("JobState") in states else None
        return wait_for(f"job {jobid} in {'/'.join(states)}", reached, timeout, interval=0.2,
                        alive=self.daemons.check_alive)


# ------------------------------------------------------------------------------------ ssh hosts

HOSTS = {"simmtm-node1": "127.0.0.2", "simmtm-node2": "127.0.0.3"}


class SshHosts:
    """Two host names for this machine on two loopback addresses (/etc/hosts lines added here and
    removed by `stop`), one sshd listening on both with a temporary host key, and a client side
    that reaches them with a temporary user key: `bin/ssh` runs the system ssh with `-F` our config,
    so neither ~/.ssh nor /etc/ssh is read or changed. Put `bin` first on PATH: DeepSpeed's ssh check
    and pdsh's ssh module then use it."""

    def __init__(self, root: Path):
        self.root = root
        self.daemons = Daemons(root)
        self.port = free_port()
        self.bin = root / "bin"
        self.made_run_sshd = False

    def env(self, **extra) -> dict:
        env = self.daemons.env(**extra)
        env["PATH"] = os.pathsep.join([str(self.bin), env["PATH"]])
        return env

    def start(self, timeout: float = 30) -> None:
        r = self.root
        keygen = which("ssh-keygen")
        for name in ("host_key", "user_key"):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", f"simmtm-test-{name}", "-f", str(r / name)],
                           check=True, capture_output=True)
        (r / "authorized_keys").write_text((r / "user_key.pub").read_text())
        host_pub = (r / "host_key.pub").read_text().split()[:2]
        (r / "known_hosts").write_text("".join(f"[{n}]:{self.port},[{a}]:{self.port} {' '.join(host_pub)}\n"
                                               for n, a in HOSTS.items()))
        (r / "sshd_config").write_text("\n".join([
            f"Port {self.port}", *(f"ListenAddress {a}" for a in HOSTS.values()),
            f"HostKey {r}/host_key", f"PidFile {r}/sshd.pid", f"AuthorizedKeysFile {r}/authorized_keys",
            "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "X11Forwarding no",
            "MaxStartups 64", "LogLevel VERBOSE",
            f"SetEnv {MARK}={self.daemons.token}",  # every session, and all it starts, carries the token
        ]) + "\n")
        (r / "ssh_config").write_text("\n".join([
            f"Host {' '.join(HOSTS)} {' '.join(HOSTS.values())}", f"  Port {self.port}", "  User root",
            f"  IdentityFile {r}/user_key", "  IdentitiesOnly yes", f"  UserKnownHostsFile {r}/known_hosts",
            "  GlobalKnownHostsFile /dev/null", "  StrictHostKeyChecking yes", "  BatchMode yes",
            "  LogLevel ERROR", "Host *", "  ConnectTimeout 10",
        ]) + "\n")
        self.bin.mkdir(exist_ok=True)
        wrapper = self.bin / "ssh"
        wrapper.write_text(f"#!/bin/sh\n# test ssh: the system client with this test's config and keys only\n"
                           f"exec {which('ssh')} -F {r}/ssh_config \"$@\"\n")
        wrapper.chmod(0o755)
        edit_etc_hosts(self.daemons.token, [(a, n) for n, a in HOSTS.items()])
        if not Path("/run/sshd").exists():  # sshd's privilege-separation directory
            Path("/run/sshd").mkdir(mode=0o755, parents=True)
            self.made_run_sshd = True
        self.daemons.start("sshd", [which("sshd"), "-D", "-e", "-f", str(r / "sshd_config")], self.daemons.env())
        for host in HOSTS:
            wait_for(f"sshd on {host}", lambda h=host: self.ssh(h, "true").returncode == 0, timeout, interval=0.2,
                     alive=self.daemons.check_alive)

    def ssh(self, host: str, *command) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", host, *command], env=self.env(), capture_output=True, text=True, timeout=30)

    def sessions(self) -> list[tuple[int, str]]:
        """Live processes started through the hosts (launchers, ranks, ssh sessions, ...), not sshd itself."""
        keep = {p.pid for _, p in self.daemons.procs}
        return [(pid, args) for pid, args in marked_processes(self.daemons.token) if pid not in keep]

    def end_sessions(self) -> None:
        for pid, _ in self.sessions():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> list[tuple[int, str]]:
        try:
            return self.daemons.stop()
        finally:
            edit_etc_hosts(self.daemons.token, [])
            if self.made_run_sshd:
                shutil.rmtree("/run/sshd", ignore_errors=True)


def read_reports(folder: Path) -> dict:
    """The hold hook's reports (tests/cluster_hooks/sitecustomize.py), by rank."""
    return {r["rank"]: r for r in (json.loads(p.read_text()) for p in folder.glob("*.rank*.json"))}
