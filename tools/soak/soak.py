#!/usr/bin/env python3
"""Chaos soak of the qcal service (issue 15; docs/OPERATIONS.md, "Chaos soak").

Starts a qcal-coordinator (real RocksDB) and N CPU workers on loopback, submits single- and
multi-worker jobs concurrently with idempotency keys (some keys submitted again, some raced by two
submitters at once), and for --duration seconds injects seeded faults:

  kill_worker       SIGKILL of a random worker (restarted on the same scratch directory), and
                    kills at random fault points inside workers (QCAL_FAULT ...:p=P:kill)
  kill_coordinator  SIGKILL of the coordinator (restarted on the same data directory and port), and
                    kills at random fault points inside it
  stop_worker       SIGSTOP of a random worker for longer than its lease, then SIGCONT, and stops
                    at random fault points inside workers (QCAL_FAULT ...:p=P:stop), continued
                    the same way
  store_error       a failed store write at random commits (QCAL_FAULT coordinator:stage=write:p=P)

Then it stops the faults, restarts the processes without QCAL_FAULT, waits for every job, submits
every key once more, stops everything gracefully and checks:

  - every acknowledged job SUCCEEDED, its output byte-identical (qcal_run.json aside) to
    `qcal quantize` of the same spec run undisturbed;
  - one job per idempotency key (the same job id for every acknowledgement of a key, one job per
    output name, no "in use" refusal of a repeated key);
  - no leftover files: nothing but the finished outputs under the output root, empty worker
    scratch directories, no job files under the data directory;
  - `qcal-coordinator --check-store` finds the store consistent;
  - no process exited in a way the soak did not cause.

Prints a table and exits 1 when a must-be-zero number is not zero (or a fault kind fell short of
--min-faults). The seed fixes every decision the driver makes (which job, which key repeats, which
fault when, which process) and the seeds of the processes' own QCAL_FAULT draws; the operating
system's timing still varies between runs, so a replay repeats the schedule, not every outcome.

Uses only the Python standard library and the binaries of a build tree (qcal, qcal-coordinator,
qcal-worker built with QCAL_TESTS=ON, so that QCAL_FAULT is honoured).
"""

import argparse
import collections
import filecmp
import heapq
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Job variants: (name, recipe YAML, samples, seq_len, workers "min:max"). Chunks are 8 samples,
# so the gang jobs split their chunks among 2-3 workers. Outputs do not depend on the gang size.
VARIANTS = [
    ("aser-er", "method: gptq\nweights: {bits: 4, group_size: 32}\nactivations: {bits: 8}\n"
     "smoothing: {method: aser, outlier_channels: 4}\nerror_reconstruction: {rank: 8}\n",
     16, 64, "1"),
    ("gptq-gang2", "method: gptq\nweights: {bits: 4, group_size: 32}\n", 32, 32, "2"),
    ("rtn-gang2-3", "method: rtn\nweights: {bits: 3, group_size: 32}\n", 24, 32, "2:3"),
    ("gptq-actorder", "method: gptq\nweights: {bits: 3, group_size: -1}\n"
     "gptq: {act_order: true}\n", 16, 64, "1"),
    ("aser-gang3", "method: gptq\nweights: {bits: 4, group_size: 32}\nactivations: {bits: 8}\n"
     "smoothing: {method: aser, outlier_channels: 4}\nerror_reconstruction: {rank: 8}\n",
     24, 32, "3"),
]
SEED = 7            # calibration seed of every job
EVAL_WINDOWS = 2

FAULT_KINDS = ["kill_worker", "kill_coordinator", "stop_worker", "store_error"]


def log(msg):
    sys.stderr.write("soak %s %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def process_state(pid):
    """The state letter of /proc/PID/stat ('T' when stopped), or '' when unreadable."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


class Proc:
    """A child process of the soak with its log file."""

    def __init__(self, role, slot, argv, env, log_path):
        self.role, self.slot, self.log_path = role, slot, log_path
        self.logf = open(log_path, "ab")
        self.popen = subprocess.Popen(argv, env=env, stdout=self.logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        self.pid = self.popen.pid
        self.signalled = None   # the signal the soak sent to end it
        self.stopped = False

    def alive(self):
        return self.popen.poll() is None

    def signal(self, sig):
        if self.alive():
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.signalled = sig
            os.kill(self.pid, sig)

    def wait(self, timeout):
        try:
            self.popen.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def close(self):
        self.logf.close()


class Soak:
    def __init__(self, args):
        self.args = args
        # The fault schedule's own generator (chaos thread and supervisor, under the lock).
        self.rng = random.Random(args.seed)
        self.work = args.work_dir or tempfile.mkdtemp(prefix="qcal-soak-")
        os.makedirs(self.work, exist_ok=True)
        # The binaries are copied, so that a rebuild of the tree during a long run changes nothing.
        self.bin = os.path.join(self.work, "bin")
        os.makedirs(self.bin, exist_ok=True)
        for name in ("qcal", "qcal-coordinator", "qcal-worker"):
            shutil.copy2(os.path.join(os.path.abspath(args.build), "bin", name), self.bin)
        self.input = os.path.join(self.work, "input")
        self.output = os.path.join(self.work, "output")
        self.data = os.path.join(self.work, "data")
        self.logs = os.path.join(self.work, "logs")
        self.baseline = os.path.join(self.work, "baseline")
        for d in (self.input, self.output, self.data, self.logs, self.baseline):
            os.makedirs(d, exist_ok=True)
        self.lock = threading.RLock()
        self.coordinator = None
        self.coordinator_starts = 0
        self.port = 0
        self.workers = {}          # slot -> Proc
        self.worker_starts = 0
        self.faulty = True         # processes start with QCAL_FAULT
        self.faults = collections.Counter()
        self.fault_detail = collections.Counter()
        self.unexpected = []       # exits the soak did not cause
        self.keys = {}             # key -> {"variant", "output", "acks": [job ids]}
        self.refusals = []         # repeated keys refused as "in use" (duplicates)
        self.never_acked = []      # keys whose submit never succeeded
        self.jobs = {}             # job id -> last seen JSON
        self.events = []           # (time, action, arg) heap of restarts and SIGCONTs
        self.stop_submitting = threading.Event()
        self.done = threading.Event()
        self.halt = threading.Event()   # ends the supervisor
        self.problems = []
        self.driver_errors = []    # exceptions in the soak's own threads

    # ----------------------------------------------------------------------------------------
    # Inputs and baselines

    def prepare_model(self):
        shared = os.environ.get("QCAL_SHARED_DIR") or os.path.join(os.path.dirname(REPO), "shared")
        stories = os.path.join(shared, "models", "stories260k")
        if self.args.model != "synth" and os.path.isdir(stories):
            dst = os.path.join(self.input, "models", "stories260k")
            os.makedirs(dst, exist_ok=True)
            for f in ("config.json", "model.safetensors", "tokenizer.model"):
                shutil.copy(os.path.join(stories, f), dst)
            os.makedirs(os.path.join(self.input, "data"), exist_ok=True)
            for f in ("tinystories-calib.txt", "tinystories-eval.txt"):
                shutil.copy(os.path.join(shared, "data", f), os.path.join(self.input, "data"))
            self.model = ("models/stories260k", "data/tinystories-calib.txt",
                          "data/tinystories-eval.txt")
        elif self.args.model == "shared":
            sys.exit("soak: --model shared, but %s is missing" % stories)
        else:
            self.run([os.path.join(self.bin, "qcal"), "synth", "--out",
                      os.path.join(self.input, "tiny"), "--preset", "tiny"], "synth")
            self.model = ("tiny", "tiny/calib.txt", "tiny/eval.txt")
        log("model %s" % self.model[0])

    def run(self, argv, what, timeout=900):
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        if r.returncode != 0:
            sys.exit("soak: %s failed (%d): %s" % (what, r.returncode,
                                                     r.stderr.decode(errors="replace")[-2000:]))
        return r.stdout.decode()

    def recipe_path(self, v):
        return os.path.join(self.work, "recipe-%s.yaml" % VARIANTS[v][0])

    def job_args(self, v):
        name, _, samples, seq_len, _ = VARIANTS[v]
        return ["--recipe", self.recipe_path(v), "--samples", str(samples), "--seq-len",
                str(seq_len), "--seed", str(SEED), "--threads", "1",
                "--eval-max-windows", str(EVAL_WINDOWS)]

    def make_baselines(self):
        for v, (name, recipe, _, _, _) in enumerate(VARIANTS):
            with open(self.recipe_path(v), "w") as f:
                f.write(recipe)
            out = os.path.join(self.baseline, name)
            if os.path.isdir(out):
                shutil.rmtree(out)
            t0 = time.time()
            self.run([os.path.join(self.bin, "qcal"), "quantize",
                      "--model", os.path.join(self.input, self.model[0]),
                      "--calib", os.path.join(self.input, self.model[1]),
                      "--eval-text", os.path.join(self.input, self.model[2]),
                      "--out", out, "--device", "cpu"] + self.job_args(v), "baseline " + name)
            log("baseline %s: %.1f s" % (name, time.time() - t0))

    # ----------------------------------------------------------------------------------------
    # Processes

    def fault_env(self, process, life):
        """QCAL_FAULT for one process life: its seed is the soak's seed and the life's number."""
        env = dict(os.environ)
        env.pop("QCAL_FAULT", None)
        if not self.faulty:
            return env
        a = self.args
        seed = a.seed * 100003 + life
        faults = []
        if process == "coordinator":
            if a.store_error_p > 0:
                faults.append("coordinator:stage=write:p=%g:seed=%d:error" % (a.store_error_p, seed))
            if a.point_kill_p > 0:
                faults.append("coordinator:stage=*:p=%g:seed=%d:kill" % (a.point_kill_p, seed + 1))
        else:
            if a.point_kill_p > 0:
                faults.append("worker:stage=*:p=%g:seed=%d:kill" % (a.point_kill_p, seed))
            if a.point_stop_p > 0:
                faults.append("worker:stage=*:p=%g:seed=%d:stop" % (a.point_stop_p, seed + 1))
        if faults:
            env["QCAL_FAULT"] = ",".join(faults)
        return env

    def address(self):
        return "127.0.0.1:%d" % self.port

    def start_coordinator(self):
        self.coordinator_starts += 1
        n = self.coordinator_starts
        port_file = os.path.join(self.work, "ports.json")
        if os.path.exists(port_file):
            os.remove(port_file)
        a = self.args
        argv = [os.path.join(self.bin, "qcal-coordinator"), "--listen", self.address(),
                "--metrics-listen", "", "--data-dir", self.data, "--input-root", self.input,
                "--output-root", self.output, "--port-file", port_file,
                "--lease-seconds", str(a.lease_seconds), "--heartbeat-seconds",
                str(a.lease_seconds / 6), "--store-reopen-seconds", "0.5",
                "--max-attempts", "100000", "--max-active-jobs-per-client", "100000",
                "--checkpoint-every", str(a.checkpoint_every)]
        p = Proc("coordinator", 0, argv, self.fault_env("coordinator", n),
                 os.path.join(self.logs, "coordinator-%03d.log" % n))
        self.coordinator = p
        if self.port != 0:
            return  # a restart on the known port: clients and workers find it when it listens
        end = time.time() + 60
        while time.time() < end:
            if os.path.exists(port_file):
                with open(port_file) as f:
                    self.port = json.load(f)["grpc_port"]
                return
            if not p.alive():
                break  # killed at a fault point during start-up: the supervisor restarts it
            time.sleep(0.05)
        if p.alive():
            sys.exit("soak: the coordinator did not write its port file (%s)" % p.log_path)

    def start_worker(self, slot):
        self.worker_starts += 1
        n = self.worker_starts
        scratch = os.path.join(self.work, "scratch", "w%d" % slot)
        os.makedirs(scratch, exist_ok=True)
        argv = [os.path.join(self.bin, "qcal-worker"), "--coordinator", self.address(),
                "--input-root", self.input, "--output-root", self.output, "--threads", "1",
                "--scratch-dir", scratch, "--timeout-seconds", "5",
                "--peer-timeout-seconds", str(self.args.peer_timeout)]
        self.workers[slot] = Proc("worker", slot, argv, self.fault_env("worker", n),
                                  os.path.join(self.logs, "worker-w%d-%03d.log" % (slot, n)))

    def kill_all(self):
        with self.lock:
            for p in [self.coordinator] + list(self.workers.values()):
                if p is not None and p.alive():
                    os.kill(p.pid, signal.SIGKILL)

    def schedule(self, delay, action, arg=None):
        heapq.heappush(self.events, (time.time() + delay, action, arg))

    def note_exit(self, p):
        """Classifies the end of a process the soak did not just end itself."""
        rc = p.popen.returncode
        if p.signalled is not None:
            return
        if rc == -signal.SIGKILL and self.faulty:
            kind = "kill_coordinator" if p.role == "coordinator" else "kill_worker"
            self.faults[kind] += 1
            self.fault_detail[kind + " (fault point)"] += 1
            return
        self.unexpected.append("%s (pid %d) exited with %s; log %s" % (
            p.role, p.pid, "signal %d" % -rc if rc < 0 else "code %d" % rc, p.log_path))
        log("UNEXPECTED: " + self.unexpected[-1])

    def supervise(self):
        """Restarts dead processes and runs due events. Called with the lock held."""
        now = time.time()
        while self.events and self.events[0][0] <= now:
            _, action, arg = heapq.heappop(self.events)
            if action == "cont":
                p = arg
                if p.alive():
                    os.kill(p.pid, signal.SIGCONT)
                p.stopped = False
            elif action == "restart_coordinator":
                if self.coordinator is None:
                    self.start_coordinator()
            elif action == "restart_worker":
                if arg not in self.workers:
                    self.start_worker(arg)
        c = self.coordinator
        if c is not None and not c.alive():
            self.note_exit(c)
            c.close()
            self.coordinator = None
            self.schedule(self.rng.uniform(0.2, 1.5), "restart_coordinator")
        for slot, w in list(self.workers.items()):
            if w.alive() and not w.stopped and process_state(w.pid) == "T":
                # Stopped itself at a fault point: continue it once its lease is gone.
                w.stopped = True
                self.faults["stop_worker"] += 1
                self.fault_detail["stop_worker (fault point)"] += 1
                self.schedule(self.args.lease_seconds + self.rng.uniform(0.5, 3.0), "cont", w)
            if not w.alive():
                self.note_exit(w)
                w.close()
                del self.workers[slot]
                self.schedule(self.rng.uniform(0.2, 2.0), "restart_worker", slot)

    # ----------------------------------------------------------------------------------------
    # Faults

    def inject(self, kind):
        with self.lock:
            if kind == "kill_coordinator":
                c = self.coordinator
                if c is None or not c.alive():
                    return False
                c.signal(signal.SIGKILL)
                c.wait(10)
            elif kind == "kill_worker":
                live = [w for w in self.workers.values() if w.alive()]
                if not live:
                    return False
                w = self.rng.choice(sorted(live, key=lambda p: p.slot))
                w.signal(signal.SIGKILL)
                w.wait(10)
            elif kind == "stop_worker":
                live = [w for w in self.workers.values() if w.alive() and not w.stopped]
                if not live:
                    return False
                w = self.rng.choice(sorted(live, key=lambda p: p.slot))
                os.kill(w.pid, signal.SIGSTOP)
                w.stopped = True
                self.schedule(self.args.lease_seconds + self.rng.uniform(0.5, 3.0), "cont", w)
            self.faults[kind] += 1
            self.fault_detail[kind + " (signal)"] += 1
            self.supervise()
            return True

    def guarded(self, fn, *args):
        """Runs fn(*args) on a thread; an exception there fails the soak instead of vanishing."""
        def run():
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 (recorded and reported)
                import traceback
                with self.lock:
                    self.driver_errors.append(traceback.format_exc())
                log("DRIVER ERROR in %s:\n%s" % (fn.__name__, traceback.format_exc()))
        return threading.Thread(target=run, daemon=True)

    def supervisor(self):
        while not self.halt.is_set():
            with self.lock:
                self.supervise()
            self.halt.wait(0.05)

    def chaos(self):
        a = self.args
        every = {"kill_worker": a.kill_worker_every, "kill_coordinator": a.kill_coordinator_every,
                 "stop_worker": a.stop_worker_every}
        with self.lock:
            next_at = {k: time.time() + self.rng.expovariate(1.0 / v)
                       for k, v in sorted(every.items()) if v > 0}
        end = self.t0 + a.duration
        while time.time() < end:
            with self.lock:
                for kind in sorted(next_at):
                    if time.time() >= next_at[kind]:
                        self.inject(kind)
                        next_at[kind] = time.time() + self.rng.expovariate(1.0 / every[kind])
            time.sleep(0.05)

    # ----------------------------------------------------------------------------------------
    # Client side

    def qcal(self, args, timeout=20):
        argv = [os.path.join(self.bin, "qcal")] + args + [
            "--coordinator", self.address(), "--client-id", "soak", "--timeout-seconds", "5"]
        try:
            r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return 124, "", "timed out"
        except OSError as e:
            return 127, "", str(e)
        return r.returncode, r.stdout.decode(), r.stderr.decode(errors="replace")

    def submit(self, key, rng):
        """Submits `key` until acknowledged; returns the job id, or None."""
        k = self.keys[key]
        v = k["variant"]
        args = ["submit", "--model", self.model[0], "--calib", self.model[1], "--eval-text",
                self.model[2], "--output-name", k["output"], "--idempotency-key", key,
                "--workers", VARIANTS[v][4]] + self.job_args(v)
        deadline = time.time() + self.args.submit_patience
        last = ""
        while time.time() < deadline:
            rc, out, err = self.qcal(args)
            if rc == 0 and out.strip():
                job_id = out.strip().splitlines()[0]
                with self.lock:
                    k["acks"].append(job_id)
                return job_id
            last = err.strip().splitlines()[-1] if err.strip() else "exit %d" % rc
            if "in use by job" in err or "exists under the output root" in err:
                with self.lock:
                    self.refusals.append("%s: %s" % (key, last))
                return None
            time.sleep(rng.uniform(0.1, 0.6))
        with self.lock:
            self.never_acked.append("%s: %s" % (key, last))
        return None

    def submitter(self, index):
        rng = random.Random(self.args.seed * 7919 + index)
        while not self.stop_submitting.is_set():
            with self.lock:
                active = sum(1 for k in self.keys.values() for j in set(k["acks"])
                             if self.jobs.get(j, {}).get("state") not in
                             ("SUCCEEDED", "FAILED", "CANCELLED"))
                if active >= self.args.max_inflight or len(self.keys) >= self.args.jobs:
                    acked = [key for key, k in self.keys.items() if k["acks"]]
                    key = None
                else:
                    n = len(self.keys)
                    key = "soak-%d-%04d" % (self.args.seed, n)
                    # Key n's variant and whether it is raced depend on the seed and n only.
                    key_rng = random.Random(self.args.seed * 1000003 + n)
                    v = key_rng.randrange(len(VARIANTS))
                    self.keys[key] = {"variant": v, "output": "job-%04d" % n, "acks": []}
                    race = key_rng.random() < 0.15
                    acked = [k2 for k2, k in self.keys.items() if k["acks"]]
            if key is None:
                # Nothing new to submit now: sometimes repeat an acknowledged key.
                if acked and rng.random() < 0.3:
                    self.submit(rng.choice(sorted(acked)), rng)
                time.sleep(rng.uniform(0.2, 1.0))
                continue
            if race:
                # Two submitters at once with the same new key.
                t = self.guarded(self.submit, key, random.Random(rng.random()))
                t.start()
                self.submit(key, rng)
                t.join()
            else:
                self.submit(key, rng)
            if acked and rng.random() < 0.25:
                self.submit(rng.choice(sorted(acked)), rng)
            time.sleep(rng.uniform(0.0, 0.5))

    def poll_jobs(self):
        rc, out, _ = self.qcal(["list", "--json"], timeout=30)
        if rc != 0:
            return False
        try:
            jobs = json.loads(out)["jobs"]
        except (ValueError, KeyError):
            return False
        with self.lock:
            self.jobs = {j["job_id"]: j for j in jobs}
        return True

    def monitor(self):
        last_print = 0
        while not self.done.is_set():
            self.poll_jobs()
            if time.time() - last_print >= 30:
                last_print = time.time()
                with self.lock:
                    states = collections.Counter(j["state"] for j in self.jobs.values())
                    acked = sum(1 for k in self.keys.values() if k["acks"])
                    faults = dict(self.faults)
                log("t=%ds keys %d acked %d jobs %s faults %s" % (
                    time.time() - self.t0, len(self.keys), acked, dict(states), faults))
            self.done.wait(2)

    # ----------------------------------------------------------------------------------------
    # The run

    def main(self):
        a = self.args
        log("work dir %s, seed %d" % (self.work, a.seed))
        self.prepare_model()
        self.make_baselines()
        self.t0 = time.time()
        with self.lock:
            self.start_coordinator()
            for slot in range(a.workers):
                self.start_worker(slot)
        supervisor = self.guarded(self.supervisor)
        supervisor.start()
        threads = [self.guarded(self.monitor)]
        threads += [self.guarded(self.submitter, i) for i in range(a.submitters)]
        for t in threads:
            t.start()
        self.chaos()
        log("fault phase over after %d s: draining" % (time.time() - self.t0))
        self.stop_submitting.set()
        # Every process is replaced by one without QCAL_FAULT: the processes of the fault phase
        # are SIGKILLed (one more crash each, not counted), stopped ones included. Submits in
        # flight go on against the new ones.
        with self.lock:
            self.faulty = False
            self.events = []
            procs = ([self.coordinator] if self.coordinator else []) + list(self.workers.values())
            for p in procs:
                p.signal(signal.SIGKILL)
            for p in procs:
                p.wait(10)
                p.close()
            self.coordinator = None
            self.workers = {}
            self.start_coordinator()
            for slot in range(a.workers):
                self.start_worker(slot)
        for t in threads[1:]:
            t.join()
        drain_end = time.time() + a.drain_timeout
        while time.time() < drain_end:
            if self.poll_jobs():
                with self.lock:
                    ids = {j for k in self.keys.values() for j in k["acks"]}
                    pending = [j for j in ids if self.jobs.get(j, {}).get("state") not in
                               ("SUCCEEDED", "FAILED", "CANCELLED")]
                if not pending:
                    break
            time.sleep(1)
        # Every key once more: the same job must come back.
        rng = random.Random(a.seed)
        for key in sorted(self.keys):
            if self.keys[key]["acks"]:
                self.submit(key, rng)
        self.poll_jobs()
        self.done.set()
        threads[0].join()
        self.halt.set()
        supervisor.join()
        with self.lock:
            self.supervise()
            procs = list(self.workers.values()) + [c for c in [self.coordinator] if c]
            for p in procs:
                p.signal(signal.SIGTERM)
            for p in procs:
                if not p.wait(60):
                    p.signal(signal.SIGKILL)
                    p.wait(10)
                    self.unexpected.append("%s (pid %d) ignored SIGTERM for 60 s" % (p.role, p.pid))
                elif p.popen.returncode != 0:
                    self.unexpected.append("%s (pid %d) exited with %d after SIGTERM; log %s" % (
                        p.role, p.pid, p.popen.returncode, p.log_path))
                p.close()
        self.wall = time.time() - self.t0
        return self.check()

    # ----------------------------------------------------------------------------------------
    # Checks

    def count_store_errors(self):
        n = 0
        for name in os.listdir(self.logs):
            if name.startswith("coordinator-"):
                with open(os.path.join(self.logs, name), errors="replace") as f:
                    n += sum(1 for line in f if "fault injection: stage=write" in line and
                             line.rstrip().endswith(": error"))
        return n

    def same_output(self, a, b):
        def files(d):
            out = []
            for root, _, names in os.walk(d):
                out += [os.path.relpath(os.path.join(root, n), d) for n in names]
            return sorted(out)
        fa, fb = files(a), files(b)
        if fa != fb or not fa:
            return False
        return all(f == "qcal_run.json" or filecmp.cmp(os.path.join(a, f), os.path.join(b, f),
                                                         shallow=False) for f in fa)

    def check(self):
        a = self.args
        self.faults["store_error"] = self.count_store_errors()
        self.fault_detail["store_error (fault point)"] = self.faults["store_error"]
        by_output = collections.Counter(j["output"] for j in self.jobs.values())
        acked = {key: k for key, k in self.keys.items() if k["acks"]}
        succeeded = identical = failed = duplicated = 0
        for key, k in sorted(acked.items()):
            ids = set(k["acks"])
            if len(ids) > 1 or by_output[k["output"]] > 1:
                duplicated += 1
                self.problems.append("key %s: jobs %s, %d with output %s" % (
                    key, sorted(ids), by_output[k["output"]], k["output"]))
            job = self.jobs.get(k["acks"][0])
            if job is None:
                self.problems.append("key %s: job %s is not listed" % (key, k["acks"][0]))
                continue
            if job["state"] != "SUCCEEDED":
                if job["state"] == "FAILED":
                    failed += 1
                self.problems.append("key %s: job %s %s %s" % (key, job["job_id"], job["state"],
                                                                job.get("error", "")))
                continue
            succeeded += 1
            out = os.path.join(self.output, k["output"])
            run_json = os.path.join(out, "qcal_run.json")
            try:
                with open(run_json) as f:
                    run_job = json.load(f).get("job_id")
            except (OSError, ValueError):
                run_job = None
            if run_job == job["job_id"] and self.same_output(
                    out, os.path.join(self.baseline, VARIANTS[k["variant"]][0])):
                identical += 1
            else:
                self.problems.append("key %s: output %s differs from the baseline" % (
                    key, k["output"]))
        duplicated += len(self.refusals)
        self.problems += ["repeated key refused: " + r for r in self.refusals]
        unexpected_jobs = [j for j in self.jobs.values()
                           if j["output"] not in {k["output"] for k in acked.values()}]
        for j in unexpected_jobs:
            self.problems.append("job %s (%s) belongs to no acknowledged key" % (
                j["job_id"], j["output"]))
        # Leftover files.
        leftovers = []
        outputs = {k["output"] for k in acked.values()}
        for name in os.listdir(self.output):
            if name not in outputs:
                leftovers.append(os.path.join("output", name))
        scratch = os.path.join(self.work, "scratch")
        for slot in sorted(os.listdir(scratch)):
            for name in os.listdir(os.path.join(scratch, slot)):
                leftovers.append(os.path.join("scratch", slot, name))
        for sub in ("activations", "artifacts"):
            for root, _, names in os.walk(os.path.join(self.data, sub)):
                for n in names:
                    leftovers.append(os.path.relpath(os.path.join(root, n), self.work))
        self.problems += ["leftover: " + p for p in leftovers]
        # The store's own consistency.
        r = subprocess.run([os.path.join(self.bin, "qcal-coordinator"), "--check-store",
                            "--data-dir", self.data], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        try:
            store = json.loads(r.stdout.decode())
        except ValueError:
            store = {"ok": False, "problems": [r.stderr.decode(errors="replace").strip()]}
        self.problems += ["store: " + p for p in store.get("problems", [])]
        self.problems += ["unexpected exit: " + u for u in self.unexpected]
        self.problems += ["never acknowledged: " + n for n in self.never_acked]
        self.problems += ["driver error: " + e.strip().splitlines()[-1] for e in self.driver_errors]
        lost = len(acked) - succeeded
        rows = [
            ("wall time, s", "%d" % self.wall, ""),
            ("fault phase, s", "%d" % a.duration, ""),
            ("jobs acknowledged", len(acked), ""),
            ("  of which multi-worker", sum(1 for k in acked.values()
                                            if VARIANTS[k["variant"]][4] != "1"), ""),
            ("submits (incl. repeated keys)", sum(len(k["acks"]) for k in acked.values()), ""),
            ("succeeded", succeeded, ""),
            ("byte-identical to the undisturbed run", identical, ""),
            ("lost (acknowledged, not SUCCEEDED)", lost, "must be 0"),
            ("  of which FAILED", failed, ""),
            ("duplicated", duplicated, "must be 0"),
            ("never acknowledged", len(self.never_acked), "must be 0"),
        ]
        for kind in FAULT_KINDS:
            rows.append(("faults: " + kind, self.faults[kind],
                         ">= %d" % a.min_faults if a.min_faults else ""))
            for how in ("signal", "fault point"):
                if self.fault_detail["%s (%s)" % (kind, how)]:
                    rows.append(("  by " + how, self.fault_detail["%s (%s)" % (kind, how)], ""))
        rows += [
            ("leftover files", len(leftovers), "must be 0"),
            ("store check problems", len(store.get("problems", [])), "must be 0"),
            ("unexpected process exits", len(self.unexpected), "must be 0"),
        ]
        width = max(len(r[0]) for r in rows)
        print("qcal chaos soak: seed %d, %d workers, %s" % (a.seed, a.workers, self.model[0]))
        for name, value, rule in rows:
            print("  %-*s  %8s  %s" % (width, name, value, rule))
        bad = (lost or duplicated or self.never_acked or leftovers or not store.get("ok") or
               self.driver_errors or
               self.unexpected or unexpected_jobs or identical != len(acked) or not acked)
        short = [k for k in FAULT_KINDS if self.faults[k] < a.min_faults]
        if short:
            self.problems.append("fewer than %d faults of kind %s" % (a.min_faults, short))
        for p in self.problems[:50]:
            print("  problem: " + p)
        if a.summary_json:
            with open(a.summary_json, "w") as f:
                json.dump({"rows": [[n, v, r] for n, v, r in rows], "problems": self.problems,
                           "seed": a.seed, "work_dir": self.work}, f, indent=1)
        ok = not bad and not short
        print("RESULT: %s (work dir %s)" % ("PASS" if ok else "FAIL", self.work))
        if ok and not a.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", default=os.path.join(REPO, "build"),
                   help="build tree with bin/qcal, bin/qcal-coordinator, bin/qcal-worker")
    p.add_argument("--work-dir", help="where everything goes (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir after a pass")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=180, help="fault phase, seconds")
    p.add_argument("--jobs", type=int, default=1000000, help="stop submitting new keys after this")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--submitters", type=int, default=3)
    p.add_argument("--max-inflight", type=int, default=6,
                   help="submit new keys only while fewer acknowledged jobs are unfinished")
    p.add_argument("--model", choices=["auto", "shared", "synth"], default="auto",
                   help="stories260k from $QCAL_SHARED_DIR (or ../shared), or `qcal synth` tiny")
    p.add_argument("--lease-seconds", type=float, default=3)
    p.add_argument("--checkpoint-every", type=int, default=2)
    p.add_argument("--peer-timeout", type=float, default=30)
    p.add_argument("--kill-worker-every", type=float, default=20,
                   help="mean seconds between SIGKILLs of a worker (0: none)")
    p.add_argument("--kill-coordinator-every", type=float, default=25)
    p.add_argument("--stop-worker-every", type=float, default=25)
    p.add_argument("--store-error-p", type=float, default=0.02,
                   help="probability that a coordinator store write fails")
    p.add_argument("--point-kill-p", type=float, default=0.002,
                   help="probability that a process kills itself at a fault point it reaches")
    p.add_argument("--point-stop-p", type=float, default=0.002,
                   help="probability that a worker stops itself (SIGSTOP) at a fault point")
    p.add_argument("--min-faults", type=int, default=0,
                   help="fail unless every fault kind was injected at least this often")
    p.add_argument("--drain-timeout", type=float, default=600)
    p.add_argument("--submit-patience", type=float, default=300,
                   help="give a submit up (never acknowledged) after retrying this long")
    p.add_argument("--summary-json", help="also write the table and problems here")
    args = p.parse_args()
    soak = Soak(args)
    try:
        code = soak.main()
    except BaseException:
        soak.kill_all()  # leave no process behind
        raise
    sys.exit(code)


if __name__ == "__main__":
    main()
