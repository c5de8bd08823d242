"""Test helpers shared by several test modules (never import one test module from another):
tiny models of several decoder-only architectures, process-tree tools, engines run to the end in
this process, and real clusters on this one machine for the launcher
tests (a SLURM controller with several slurmd "nodes", and a Ray head; each keeps its state under
a temp folder, starts its daemons as plain processes and stops exactly those, by PID, even when a
test fails)."""
from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import (AutoModelForCausalLM, BloomConfig, Gemma2Config, Gemma3TextConfig, GPT2Config, MistralConfig,
                          MptConfig, OPTConfig, PhiConfig, Qwen2Config)

from distgen.config import GenerationConfig
from distgen.engine import build_engine
from distgen.parallel.loop import run_loop
from distgen.inputs.records import RecordFields, record_to_prompt
from distgen.models.tiny import build_tokenizer

CPU = torch.device("cpu")


def engine_for(model, tokenizer, records, cfg: GenerationConfig, eos_ids=(), assistant=None, stop_check=None):
    """`records` may carry any per-record setting (records.OVERRIDES), checked as a dataset's are."""
    prompts = [record_to_prompt(r, i, f"record {i}", RecordFields()) for i, r in enumerate(records)]
    queue = [(p, tokenizer(p.text)["input_ids"]) for p in prompts]
    return build_engine(model, queue, cfg, tokenizer.pad_token_id, list(eos_ids), CPU, assistant=assistant,
                        stop_check=stop_check, tokenizer=tokenizer)


def reads_per_step(engine) -> list[int]:
    """Count the host reads (engine/host.py) each step of `engine` makes from now on, into the list returned."""
    from distgen.engine.host import READS
    counts, step = [], engine.step

    def counted():
        before = READS.count
        done = step()
        counts.append(READS.count - before)
        return done
    engine.step = counted
    return counts


def generate_all(engine) -> dict:
    """Run an engine to the end in this process; completions by prompt id."""
    return {c.prompt.id: c for c in run_all(engine)}


def generate_samples(engine) -> dict:
    """Run an engine to the end in this process; completions by (prompt id, sample_index), each once."""
    completions = run_all(engine)
    got = {(c.prompt.id, c.sample): c for c in completions}
    assert len(got) == len(completions), "a (prompt, sample) finished twice"
    return got


def run_all(engine) -> list:
    completions = []
    with torch.no_grad():
        run_loop(engine, lockstep=False, idle_step=lambda: None, device=CPU, on_finished=completions.extend)
    assert not engine.has_work
    return completions


SLURM_DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch")


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free a moment ago."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, log: Optional[Path] = None,
               poll_s: float = 0.1) -> float:
    """Seconds until `condition()` held; fails naming `what` (and the tail of `log`) after `timeout_s`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail}")
        time.sleep(poll_s)
    return time.monotonic() - start


def signal_each(pids, signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def stop_pids(pids, grace_s: float = 5.0) -> None:
    """SIGTERM each process we started, then SIGKILL what is left after `grace_s` (0: SIGKILL at once)."""
    pids = list(pids)
    signal_each(pids, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    for pid in pids:
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.1)
    signal_each([pid for pid in pids if alive(pid)], signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def missing_slurm() -> str:
    """Why a local SLURM cluster cannot start here, or "" when it can."""
    absent = [name for name in SLURM_DAEMONS if not shutil.which(name, path=os.environ["PATH"] + ":/usr/sbin")]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} not found; scripts/test.sh installs slurm-wlm and munge)"
    if os.geteuid() != 0:
        return "a local slurmd must run as root"
    return ""


class LocalCluster:
    """Daemons started by `start`, stopped by `stop` on leaving the block, also when start fails."""

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


SLURM_CONF = """\
ClusterName=distgen
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long (+1 s) before it starts again (default 120)
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MinJobAge=600
KillWait=5
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SlurmctldParameters=enable_configless
# A job in `urgent` preempts jobs in `debug` by requeueing them (those submitted with --requeue).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{node_lines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2
"""


class LocalSlurm(LocalCluster):
    """munged, slurmctld and `nodes` slurmd on this machine; `env` lets sbatch/squeue find them."""

    def __init__(self, root: Path, nodes: int = 2, cpus: int = 2):
        self.root = root
        self.node_names = [f"dg{i + 1}" for i in range(nodes)]
        self.pids: list[int] = []
        ctld_port, *slurmd_ports = free_ports(1 + nodes)
        self.munge_socket = root / "munge" / "munge.socket"
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": os.environ["PATH"] + ":/usr/sbin"}
        host = socket.gethostname()
        # Several slurmd on one host (`slurmd -N name`): one port each, every name at 127.0.0.1.
        node_lines = "".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 "
                             f"Port={p} State=UNKNOWN\n" for n, p in zip(self.node_names, slurmd_ports))
        self.conf_text = SLURM_CONF.format(host=host, ctld_port=ctld_port, slurmd_port=slurmd_ports[0],
                                           munge_socket=self.munge_socket, root=root, node_lines=node_lines)

    def start(self) -> "LocalSlurm":
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self.conf.write_text(self.conf_text)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self.spawn(["munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                    f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--log-file={self.root / 'munge' / 'log'}",
                    f"--seed-file={self.root / 'munge' / 'seed'}"], self.root / "munge" / "out")
        wait_until(self.munge_socket.exists, 20, "munged start", self.root / "munge" / "out")
        self.spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], self.root / "slurmctld.out")
        for name in self.node_names:
            (self.root / "spool" / name).mkdir(exist_ok=True)
            self.spawn(["slurmd", "-D", "-N", name, "-f", str(self.conf)], self.root / f"slurmd-{name}.out")
        wait_until(self.nodes_idle, 60, "every slurmd registering as idle", self.root / "slurmctld.log")
        return self

    def spawn(self, argv: list[str], out: Path) -> None:
        with open(out, "wb") as log:
            proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.pids.append(proc.pid)

    def nodes_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return out.returncode == 0 and all(states.get(n) == "idle" for n in self.node_names)

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=10)
        # slurmd first (it ends its job steps), then the controller, then munge.
        stop_pids(list(reversed(self.pids)))
        self.pids.clear()


# Facts measured on this machine: without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray swaps 127.0.0.1
# for the routable address and the driver retries a wrong address forever; a token file left by
# an earlier local ray.init() can switch a new cluster to token auth.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           # a loaded machine starts the dashboard agent slowly; the raylet waits for it this long
           "RAY_raylet_start_wait_time_s": "600", "RAY_agent_register_timeout_ms": "600000"}


def missing_ray() -> str:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (it is pinned in requirements.txt)"
    return ""


class LocalRay(LocalCluster):
    """`ray start --head --block` in its own process group and temp dir; stopped by killing that group
    (never `ray stop`, which ends every Ray process on the machine)."""

    def __init__(self, root: Path, cpus: int = 2, dashboard: bool = False, env: Optional[dict] = None):
        self.root = root
        # Every port our own: Ray's defaults (8265, 52365, ...) are fixed and would clash with
        # another head on the machine.
        self.port, self.dashboard_port, *self.agent_ports = free_ports(6)
        self.dashboard = dashboard
        self.cpus = cpus
        self.proc: Optional[subprocess.Popen] = None
        # The actors inherit the head's environment (PYTHONPATH, OMP_NUM_THREADS).
        self.env = {**os.environ, **(env or {}), **RAY_ENV}
        self.address = f"127.0.0.1:{self.port}"
        self.job_server = f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> "LocalRay":
        ray_bin = Path(sys.executable).parent / "ray"
        argv = [str(ray_bin), "start", "--head", "--block", f"--num-cpus={self.cpus}", "--num-gpus=0",
                f"--port={self.port}", "--node-ip-address=127.0.0.1", f"--temp-dir={self.root}",
                "--object-store-memory=100000000", "--disable-usage-stats",
                f"--include-dashboard={str(self.dashboard).lower()}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}"]
        argv += [f"--{flag}={port}" for flag, port in zip(
            ("metrics-export-port", "dashboard-agent-grpc-port", "dashboard-agent-listen-port",
             "runtime-env-agent-port"), self.agent_ports)]
        with open(self.root / "head.out", "wb") as log:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(self.ready, 120, "the Ray head starting", self.root / "head.out")
        return self

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError("ray start exited:\n" + (self.root / "head.out").read_text()[-3000:])
        probe = self.job_server + "/api/version" if self.dashboard else None
        if b"Ray runtime started" not in (self.root / "head.out").read_bytes():
            return False
        if probe is None:
            return True
        import urllib.request
        try:
            with urllib.request.urlopen(probe, timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        # Daemons that outlive `ray start` (raylet, gcs, workers) are still in its process group.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None


# name -> config builder (vocab, bos, eos, pad); each a different way of encoding positions.
ARCHITECTURES: dict[str, Callable[..., object]] = {
    # learned absolute positions, tied input/output embeddings
    "gpt2": lambda v, b, e, p: GPT2Config(vocab_size=v, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                                          bos_token_id=b, eos_token_id=e, pad_token_id=p, tie_word_embeddings=True),
    # rotary, sliding-window attention (window wider than any test sequence)
    "qwen2": lambda v, b, e, p: Qwen2Config(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                            sliding_window=64, max_window_layers=1, max_position_embeddings=256,
                                            bos_token_id=b, eos_token_id=e, pad_token_id=p),
    # ALiBi, no position_ids argument, no sdpa
    "bloom": lambda v, b, e, p: BloomConfig(vocab_size=v, hidden_size=32, n_layer=2, n_head=4,
                                            bos_token_id=b, eos_token_id=e, pad_token_id=p),
    # learned positions with an offset of 2
    "opt": lambda v, b, e, p: OPTConfig(vocab_size=v, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                        num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128,
                                        bos_token_id=b, eos_token_id=e, pad_token_id=p),
    # partial rotary, parallel attention and MLP
    "phi": lambda v, b, e, p: PhiConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=256, partial_rotary_factor=0.5,
                                        bos_token_id=b, eos_token_id=e, pad_token_id=p),
    # ALiBi, no position_ids argument
    "mpt": lambda v, b, e, p: MptConfig(vocab_size=v, d_model=32, n_heads=4, n_layers=2, max_seq_len=128,
                                        bos_token_id=b, eos_token_id=e, pad_token_id=p),
}


def save_architecture(name: str, out: Path, seed: int = 0) -> Path:
    tokenizer = build_tokenizer()
    config = ARCHITECTURES[name](len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                 tokenizer.pad_token_id)
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# Tiny sliding-window models, window 6 (PROMPTS run past it), 4 layers, each way of saying which layers are local.
WINDOW = 6
WINDOW_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
WINDOW_ARCHITECTURES: dict[str, Callable[..., object]] = {
    # every layer local
    "mistral": lambda **ids: MistralConfig(**WINDOW_COMMON, **ids, sliding_window=WINDOW),
    # layers from max_window_layers=2 on local (layer_types derived from use_sliding_window)
    "qwen2": lambda **ids: Qwen2Config(**WINDOW_COMMON, **ids, use_sliding_window=True, sliding_window=WINDOW,
                                       max_window_layers=2),
    # local and global alternating (local first); scores soft-capped, query_pre_attn_scalar != head_dim
    "gemma2": lambda **ids: Gemma2Config(**WINDOW_COMMON, **ids, head_dim=16, sliding_window=WINDOW,
                                         query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                         final_logit_softcapping=8.0),
    # every second layer global through the config's sliding_window_pattern
    "gemma3": lambda **ids: Gemma3TextConfig(**WINDOW_COMMON, **ids, head_dim=16, sliding_window=WINDOW,
                                             query_pre_attn_scalar=24, sliding_window_pattern=2),
}


def window_config(name: str, tokenizer, **changes):
    config = WINDOW_ARCHITECTURES[name](vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.initializer_range = 0.2
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def build_window_model(name: str, tokenizer, seed: int = 3, **changes) -> torch.nn.Module:
    """A tiny sliding-window model in fp32, eval; Gemma's norms (1 + weight, zero at init) drawn at random so
    its greedy tokens vary. `changes`: config attributes set after the config is built (same weights by seed)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(window_config(name, tokenizer, **changes), dtype=torch.float32)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if name.startswith("gemma") and "norm" in key:
                param.normal_(0, 0.5)
    return model.eval()


def save_window_model(name: str, out: Path, **changes) -> Path:
    build_window_model(name, build_tokenizer(), **changes).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def parent_pids() -> dict[int, int]:
    """pid -> parent pid for every process visible in /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # the command name (field 2) may hold spaces; the fields after its ')' are fixed
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> list[int]:
    parents = parent_pids()
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found.extend(children)
        frontier = children
    return found


def living(pids) -> list[int]:
    """Those of `pids` still running (a zombie only waits for its new parent to reap it: it has ended)."""
    def state(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return "gone"
    return [pid for pid in pids if state(pid) not in ("gone", "Z")]


def naming(text: str) -> list[int]:
    """Processes whose command line holds `text` (`pgrep -f`), e.g. a job's own output folder."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class Terminal:
    """A pseudo-terminal that a command gets as its controlling terminal, in a session of its own (as a
    login shell's foreground job has); `hang_up` closes it as a closed terminal window or ssh connection
    does: the kernel sends the session leader SIGHUP, and writing to the terminal fails from then on."""

    def __init__(self):
        self.master, self.slave = os.openpty()
        self.output = bytearray()
        self.stopped = threading.Event()
        self.reader = threading.Thread(target=self.drain, daemon=True)  # a full terminal would block writers

    def drain(self) -> None:
        while not self.stopped.is_set():
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.output += os.read(self.master, 1 << 16)
                except OSError:
                    return

    def start(self, argv, **kwargs) -> subprocess.Popen:
        """`argv` as the session leader, on this terminal (setsid --ctty: no fork, so the pid is argv's)."""
        proc = subprocess.Popen(["setsid", "--ctty", *argv], stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                **kwargs)
        os.close(self.slave)
        self.reader.start()
        return proc

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def hang_up(self) -> None:
        self.stopped.set()
        self.reader.join()
        os.close(self.master)


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the distgen workers started under `launcher_pid`."""
    return {int(env["RANK"]): pid for pid in descendants(launcher_pid) if "RANK" in (env := environ_of(pid))}


def agree_on_batch(rank: int, world: int, port: int, rows: list[int], has_prompts: list[bool], results) -> None:
    """One gloo rank of a group that agrees on generation.batch_size=auto (run in a spawned process)."""
    import torch.distributed as dist
    from distgen.engine.memory import BatchChoice, agree_across_ranks
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        choice = agree_across_ranks(BatchChoice(rows[rank], "alone"), has_prompts[rank], CPU)
        results.put((rank, choice.rows, choice.reason))
    finally:
        dist.destroy_process_group()


class Tmpfs:
    """A real tmpfs of `size` bytes at `path` (this process must be root and allowed to mount), unmounted on
    leaving the block; `grow` makes it bigger in place. `Tmpfs.missing()` says why it cannot be, or ""."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size

    @staticmethod
    def missing() -> str:
        if os.geteuid() != 0:
            return "mounting a tmpfs (a real full disk) needs root"
        if not shutil.which("mount"):
            return "no mount command here"
        return ""

    def mount(self, *options: str) -> subprocess.CompletedProcess:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([*options, f"size={self.size}"]), "tmpfs",
                               str(self.path)], capture_output=True, text=True)

    def __enter__(self) -> "Tmpfs":
        self.path.mkdir(parents=True, exist_ok=True)
        done = self.mount()
        if done.returncode:
            import pytest
            pytest.skip(f"cannot mount a tmpfs here (a real full disk): {done.stderr.strip()}")
        return self

    def grow(self, size: int) -> None:
        self.size = size
        done = self.mount("remount")
        assert done.returncode == 0, done.stderr

    def __exit__(self, *exc) -> None:
        # A file this process still holds open there (the datasets library's) makes it busy: detach it lazily.
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(self.path)], capture_output=True)


def unreadable_runner() -> Optional[list[str]]:
    """A command prefix under which a file of mode 000 cannot be read: none needed for a user, and for root
    `setpriv` dropping the capabilities that let root read anything; None where neither is possible."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv"):
        return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    return None


class ProbeLayer:
    """A slot cache layer of given buffers (what the slot attention implementations read and write)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values, self.is_initialized = keys, values, True


def token_major(buffer: torch.Tensor) -> torch.Tensor:
    """The same (slots, kv_heads, columns, head_dim) values stored token-major (what cuda_varlen reads)."""
    return buffer.transpose(1, 2).contiguous().transpose(1, 2)


def attention_case(device: torch.device, dtype: torch.dtype, heads: int = 4, kv_heads: int = 2, dim: int = 16,
                   seed: int = 0):
    """One mixed step's attention, two ways: (query, (torch_sdpa plan, its layer), (varlen plan, its layer)).

    Slots 0 and 1 decode one token each over 3 and 5 cached columns (their new token's included); slot 2 prefills
    a 4-token prompt, slot 3 continues a prompt with 3 tokens at positions 2..4. The torch_sdpa plan reads slots
    0..1 under an additive mask. The varlen plan reads token-major copies of the same values stored with slots
    0<->1 and 2<->3 swapped, through cu_q / cu_k / seqused_k, its decode rows addressed by slot id: so the
    sequences' key offsets are not in increasing order (cu_k = 1, 0, 3, 2 slots), as in a real step."""
    from distgen.engine.kv.attention import ATTENTIONS
    from distgen.engine.kv.base import additive_mask
    from distgen.engine.kv.varlen import AttentionPlan, Segment
    generator = torch.Generator().manual_seed(seed)
    slots, columns = 4, 9
    keys, values = (torch.randn((slots, kv_heads, columns, dim), generator=generator).to(device, dtype)
                    for _ in range(2))
    query = torch.randn((1, heads, 9, dim), generator=generator).to(device, dtype)
    lengths = torch.tensor([3, 5], device=device)
    width = 8
    allowed = torch.arange(width, device=device) < lengths.unsqueeze(-1)
    sdpa = AttentionPlan([], torch.zeros(0), torch.zeros(0), decode=2, width=width,
                         decode_mask=additive_mask(allowed, dtype)[:, None, None],
                         segments=[Segment(2, 6, 2, 0), Segment(6, 9, 3, 2)], impl=ATTENTIONS.get("torch_sdpa"))
    swap = [1, 0, 3, 2]  # slot s's values live in varlen slot swap[s] (swap is its own inverse)
    int32 = dict(dtype=torch.int32, device=device)
    varlen = AttentionPlan([], torch.zeros(0), torch.zeros(0), decode=2, width=columns,
                           segments=[Segment(2, 6, swap[2], 0), Segment(6, 9, swap[3], 2)],
                           impl=ATTENTIONS.get("varlen_reference"),
                           cu_q=torch.tensor([0, 1, 2, 6, 9], **int32),
                           cu_k=torch.tensor(swap + [slots], **int32) * columns,
                           seqused_k=torch.tensor([3, 5, 4, 5], **int32), max_q=4, max_k=columns,
                           rows=torch.tensor(swap[:2], device=device))
    return query, (sdpa, ProbeLayer(keys, values)), (varlen, ProbeLayer(token_major(keys[swap]),
                                                                         token_major(values[swap])))


class ReplayingCapturer:
    """Stands in for CUDA-graph capture on a CPU (engine/graphs.py's capturer): the warm-up and the "capture" run
    the step (on padding rows), and a replay runs it again into the captured outputs, so the static buffers,
    padding and bookkeeping around graphs run as they would on a GPU. `fail`: every capture raises instead."""

    def __init__(self, fail: bool = False):
        self.fail, self.captures = fail, 0

    def __call__(self, step):
        from distgen.engine.graphs import Captured
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        step()
        outputs = step()
        self.captures += 1

        def replay():
            for out, new in zip(outputs, step()):
                out.copy_(new)
        return Captured(replay, outputs)


def save_lora(model_dir: Path, out: Path, seed: int, targets=("q_proj", "v_proj"), **settings) -> Path:
    """A LoRA adapter for the model saved in `model_dir`, saved by peft into `out`: rank 4 on `targets`, A and B
    random (init_lora_weights=False, so B is not zero and the adapter changes the outputs), seeded."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, **settings)
    get_peft_model(base, config).save_pretrained(out)
    return out


def merged_with_lora(model_dir: Path, adapter: Optional[Path]):
    """The model of `model_dir` with `adapter` merged in by peft's own merge_and_unload (None: the base model)."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return base if adapter is None else PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()


def fake_hub_cache(cache: Path, repo_id: str, model_dir: Path, commit: str = "0" * 40) -> Path:
    """`model_dir`'s files laid out as huggingface_hub caches a download of `repo_id` at `commit` (refs/main)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


class OpenAIPenalties:
    """A plain reference of OpenAI's (and vLLM's) presence and frequency penalties as an HF logits processor:
    each token's count in the completion so far (not the prompt), counted one row at a time in Python."""

    def __init__(self, prompt_length: int, presence: float, frequency: float):
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for row, ids in enumerate(input_ids[:, self.prompt_length:].tolist()):
            for token in set(ids):
                scores[row, token] -= self.frequency * ids.count(token) + self.presence
        return scores


def reference_generate(model, tokenizer, prompt: str, budget: int, eos_ids=(), presence: float = 0.0,
                       frequency: float = 0.0, **settings) -> list[int]:
    """Greedy `model.generate` with HF's own knobs (repetition_penalty, sequence_bias, min_new_tokens, ...) and the
    reference presence/frequency penalties, cut after the first EOS."""
    from transformers import LogitsProcessorList
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=model.device)
    processors = LogitsProcessorList([OpenAIPenalties(ids.shape[1], presence, frequency)] if presence or frequency
                                     else [])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget, do_sample=False,
                         eos_token_id=list(eos_ids) or None, pad_token_id=tokenizer.pad_token_id,
                         logits_processor=processors, **settings)
    new = out[0, ids.shape[1]:].tolist()
    ends = [at for at, token in enumerate(new) if token in eos_ids]
    return new[:ends[0] + 1] if ends else new
