#!/usr/bin/python3
"""The gateway's performance report, measured in one run: `make bench`.

A second nginx stands in for AnythingLLM with fixed answers (so the
backend is never the bottleneck); every nginx runs one worker, as does
the key service; wrk drives with 2 threads.  Cases (benchkit/load.py):

  plain         proxy_pass only: the baseline of the cases below
  key           + anythingllm_upstream_key
  auth          + anythingllm_auth on, a cached key (no Redis round trip)
  auth-nocache  the same with the key cache off (valid=0): Redis each time
  auth-metrics  auth with metrics counted (anythingllm_metrics_zone):
                compared with auth, so its ratio is the metrics' cost
  auth-rpm      a cached key with an rpm that never refuses
  auth_request  nginx's auth_request to a key service on the same Redis,
                the way without this module (benchkit/keysvc.py): the
                anchor the uncached case is compared with
  openai-base   the workspace chat answer (100 tokens) proxied plainly
  openai        POST /v1/chat/completions, non-stream, translated
  stream-base   the stream-chat answer (100 token frames) proxied plainly
  stream        POST /v1/chat/completions, stream: true, re-framed
  reframe       the re-framer alone (benchkit/reframe.c, -O2): upstream
                frames a second on one core, for the 100-token answer
  memory        worker memory per open stream, STREAMS slow streams held
                at once, OpenAI stream against plain proxying
                (benchkit/memory.py)

The throughput cases and reframe run in interleaved rounds: each round
runs every case once (starting one case later than the round before),
so a noisy moment costs one try of some cases rather than every try of
one; the best try of each counts (highest req/s, lowest p99).  Ratios
are to each case's baseline, from the same run.  The table printed is
the README's.

Environment: BENCH_SECONDS per try (default 5), BENCH_ROUNDS (5),
BENCH_CASES (a comma list of the names above; default all; a case's
baseline comes along), BENCH_CONNECTIONS (32), BENCH_STREAMS (10000).
"""

import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchkit import answers, load, memory, stack  # noqa: E402

SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
CONNS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
STREAMS = int(os.environ.get("BENCH_STREAMS", "10000"))
ALL = load.NAMES + ["reframe", "memory"]

# the performance targets: case: (the ratio's floor, as shown)
TARGETS = {
    "auth": (0.97, ">= 0.97"),
    "auth-nocache": (0.80, ">= 0.80"),
    "auth-metrics": (0.97, ">= 0.97"),
    "auth-rpm": (0.90, ">= 0.90"),
    "openai": (0.80, ">= 0.80"),
    "stream": (0.60, ">= 0.60"),
    "vs auth_request": (2.5, ">= 2.5"),
}


def build_reframe(work):
    """The re-framer microbenchmark against the core files, -O2."""
    src = os.path.join(stack.TOP, "ngx_anythingllm_module")
    core = sorted(os.path.join(src, f) for f in os.listdir(src)
                  if f.startswith("alm_") and f.endswith(".c"))
    exe = os.path.join(work, "reframe")
    subprocess.run([os.environ.get("CC", "cc"), "-std=c11", "-O2",
                    "-I" + src, "-o", exe,
                    os.path.join(stack.TOP, "dev", "benchkit",
                                 "reframe.c")] + core
                   + ["-lcjson", "-lcrypto"], check=True)
    stream = os.path.join(work, "stream.sse")
    with open(stream, "w") as f:
        f.write("".join(answers.stream_frames()))
    return [exe, stream]


def run_reframe(argv):
    """Frames a second on one core (at least a second of CPU time)."""
    out = subprocess.run(argv + [str(max(1, SECONDS // 2))],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[0])


def rounds(work, cases, ports, reframe):
    """Every case once a round; {name: (best value, best p99, failed)}
    and {name: [the value of each round]}."""
    best = {}
    tries = {}
    for r in range(ROUNDS):
        todo = [(c[0], lambda c=c: load.run(work, c, ports, SECONDS,
                                            CONNS)) for c in cases]
        if reframe:
            todo.append(("reframe",
                         lambda: (run_reframe(reframe), None, 0)))
        # each round starts one case later: no case always goes first
        k = r % len(todo) if todo else 0
        for name, try_ in todo[k:] + todo[:k]:
            value, p99, bad = try_()
            tries.setdefault(name, []).append(value)
            old = best.get(name, (0.0, None, 0))
            low = p99 if old[1] is None else min(p99, old[1])
            best[name] = (max(value, old[0]), low, old[2] + bad)
            sys.stderr.write("round %d/%d  %-13s %12.0f%s\n"
                             % (r + 1, ROUNDS, name, value,
                                "" if p99 is None
                                else "  p99 %.2f ms" % p99))
    return best, tries


def machine():
    """The machine a run was on, for reading its table against others:
    a slower core raises the cost of what the module computes (the
    translation, the re-framer) more than that of plain proxying."""
    model, mhz = "unknown CPU", None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key == "cpu MHz" and mhz is None:
                    mhz = float(value)
    except OSError:
        pass
    return "%d cores, %s%s, Linux %s" % (
        os.cpu_count() or 0, model,
        "" if mhz is None else " at %.0f MHz" % mhz, os.uname().release)


def median_ratio(tries, name, base):
    """The median over the rounds of a case's try to its baseline's
    try of the same round: steadier than the ratio of the best tries
    when one try of a baseline was lucky."""
    ratios = sorted(a / b for a, b in zip(tries[name], tries[base]) if b)
    if not ratios:
        return 0.0
    mid = len(ratios) // 2
    return (ratios[mid] if len(ratios) % 2
            else (ratios[mid - 1] + ratios[mid]) / 2)


def met(name, ratio):
    target = TARGETS.get(name)
    if target is None or ratio is None:
        return "", ""
    return target[1], "yes" if ratio >= target[0] else "no"


def table(cases, best, tries, mem):
    """The report, as the Markdown table the README holds.  "ratio" is
    of the best tries, which the targets are judged by; "median" is
    the median of the rounds' own ratios."""
    rows = [("case", "result", "ratio", "median", "against", "p99 ms",
             "target", "met")]
    for c in cases:
        name, base = c[0], c[5]
        rps, p99, _ = best[name]
        ratio = rps / best[base][0] if best[base][0] else 0.0
        rows.append((name, "%.0f req/s" % rps, "%.2f" % ratio,
                     "%.2f" % median_ratio(tries, name, base), base,
                     "%.2f" % p99) + met(name, ratio))
    if "auth-nocache" in best and "auth_request" in best:
        ratio = best["auth-nocache"][0] / max(best["auth_request"][0], 1)
        rows.append(("auth-nocache", "", "%.2f" % ratio,
                     "%.2f" % median_ratio(tries, "auth-nocache",
                                           "auth_request"),
                     "auth_request", "") + met("vs auth_request", ratio))
    if "reframe" in best:
        fps = best["reframe"][0]
        rows.append(("reframe", "%.2f M frames/s" % (fps / 1e6), "", "",
                     "one core", "", ">= 3 M", "yes" if fps >= 3e6
                     else "no"))
    if mem:
        extra = mem["openai"] - mem["plain"]
        rows.append(("memory", "%.1f KiB/stream" % mem["openai"],
                     "%+.1f KiB" % extra, "",
                     "plain %.1f KiB (%d streams)" % (mem["plain"],
                                                      STREAMS),
                     "", "<= +16 KiB", "yes" if extra <= 16 else "no"))
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def main():
    names = [n.strip() for n in
             os.environ.get("BENCH_CASES", ",".join(ALL)).split(",")
             if n.strip()]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        sys.exit("bench: unknown case %s (cases: %s)"
                 % (", ".join(unknown), ", ".join(ALL)))
    for tool in ("wrk", "redis-server", "cc"):
        if not shutil.which(tool):
            sys.exit("bench: %s is missing (dev/install-deps.sh bench)"
                     % tool)

    cases = load.selected(names)
    st = stack.Stack()
    try:
        ports = st.start()
        reframe = build_reframe(st.work) if "reframe" in names else None
        load.check(cases, ports)
        load.warm(st.work, cases, ports)
        best, tries = rounds(st.work, cases, ports, reframe)
        mem = (memory.measure(st, ports["redis"], STREAMS)
               if "memory" in names else None)
    finally:
        st.close()

    print("%d rounds of %d s, %d connections, best of each; %s"
          % (ROUNDS, SECONDS, CONNS, machine()))
    print(table(cases, best, tries, mem))

    if any(best[c[0]][2] for c in cases):
        sys.exit("bench: some requests failed (not 2xx, or a socket "
                 "error)")


if __name__ == "__main__":
    main()
