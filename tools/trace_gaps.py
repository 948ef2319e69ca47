"""Where a GPU waits on its host: idle gaps of a torch.profiler chrome trace, by what the host was doing.

``python3 tools/trace_gaps.py trace.json[.gz] [--rows 25] [--min-gap-us 5]``

A step is host-bound where the GPU has no kernel to run. This merges the trace's kernel, memcpy and memset
intervals, takes the idle time between them, and charges each gap to the host events (any thread) that
cover the gap's midpoint: the innermost one (what the host was executing, e.g. a launch or a Python
wrapper) and the outermost one shorter than half the trace (the phase: a compiled region, an autograd
node, the optimizer step). ``tools/benchmark.py --profile ROWS --trace`` writes the trace of one step.

``--by-function [MATCH]`` answers the other question, where the GPU's busy time comes from, for a trace taken
with Python stacks (``benchmark.py --trace-stacks``): each kernel's time is charged to every Python function
on the stack that launched it (inclusive), and the functions whose name holds MATCH are listed.
"""
import argparse
import bisect
import gzip
import json
import sys
from collections import defaultdict

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATS = {"cpu_op", "user_annotation", "python_function", "cuda_runtime", "cuda_driver"}


def load_events(path: str) -> list:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def idle_gaps(device: list, min_gap: float) -> tuple[float, float, float, list]:
    """(first start, last end, busy µs, [(gap start, gap end)]) of the merged device intervals."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in device)
    busy, gaps = 0.0, []
    start, end = spans[0]
    for s, e in spans[1:]:
        if s > end:
            busy += end - start
            if s - end >= min_gap:
                gaps.append((end, s))
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return spans[0][0], max(e for _, e in spans), busy, gaps


def report(path: str, rows: int = 25, min_gap_us: float = 5.0) -> str:
    events = load_events(path)
    device = [e for e in events if e.get("cat") in DEVICE_CATS]
    host = [e for e in events if e.get("cat") in HOST_CATS]
    if not device:
        return f"{path}: no kernels in the trace (profiled without CUDA activity?)"
    first, last, busy, gaps = idle_gaps(device, min_gap_us)
    span = last - first
    host.sort(key=lambda e: float(e["ts"]))
    starts = [float(e["ts"]) for e in host]
    longest = max((float(e["dur"]) for e in host), default=0.0)
    inner, outer = defaultdict(float), defaultdict(float)
    for g0, g1 in gaps:
        mid = (g0 + g1) / 2
        lo = bisect.bisect_left(starts, mid - longest)
        hi = bisect.bisect_right(starts, mid)
        covering = [e for e in host[lo:hi] if float(e["ts"]) + float(e["dur"]) >= mid]
        covering = [e for e in covering if float(e["dur"]) < span / 2] or covering
        if not covering:
            inner["(no host event)"] += g1 - g0
            outer["(no host event)"] += g1 - g0
            continue
        covering.sort(key=lambda e: float(e["dur"]))
        inner[covering[0]["name"][:90]] += g1 - g0
        outer[covering[-1]["name"][:90]] += g1 - g0
    idle = sum(g1 - g0 for g0, g1 in gaps)
    launches = [e for e in host if e.get("cat") == "cuda_runtime" and "Launch" in e["name"]]
    lines = [f"{path}: device span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, idle {idle / 1e3:.1f} ms in "
             f"{len(gaps)} gaps >= {min_gap_us:g} us; {len(device)} device events, {len(launches)} launches "
             f"({sum(float(e['dur']) for e in launches) / 1e3:.1f} ms of host time)"]
    for title, table in (("idle by the innermost host event", inner), ("idle by the phase (outermost host event)", outer)):
        lines.append(f"\n{title}:")
        for name, us in sorted(table.items(), key=lambda kv: -kv[1])[:rows]:
            lines.append(f"  {us / 1e3:8.2f} ms  {name}")
    return "\n".join(lines)


def _launch_stacks(events: list) -> dict:
    """{correlation id: [Python function names covering that launch, outermost first]}, per host thread."""
    python = defaultdict(list)
    launches = defaultdict(list)
    for e in events:
        if e.get("cat") == "python_function":
            python[e.get("tid")].append(e)
        elif e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in (e.get("args") or {}):
            launches[e.get("tid")].append(e)
    stacks = {}
    for tid, calls in launches.items():
        frames = sorted(python.get(tid, []), key=lambda e: (float(e["ts"]), -float(e["dur"])))
        open_frames, i = [], 0
        for call in sorted(calls, key=lambda e: float(e["ts"])):
            t = float(call["ts"])
            while i < len(frames) and float(frames[i]["ts"]) <= t:
                open_frames.append(frames[i])
                i += 1
            open_frames = [f for f in open_frames if float(f["ts"]) + float(f["dur"]) >= t]
            stacks[call["args"]["correlation"]] = [f["name"] for f in open_frames]
    return stacks


def busy_by_function(path: str, match: str = "", rows: int = 25) -> str:
    """Kernel time (inclusive) per Python function of the launching stack, for functions whose name holds
    ``match``; kernels launched outside any such function are summed as one line."""
    events = load_events(path)
    device = [e for e in events if e.get("cat") in DEVICE_CATS]
    if not any(e.get("cat") == "python_function" for e in events):
        return f"{path}: no Python stacks in the trace (profile with with_stack=True: benchmark.py --trace-stacks)"
    stacks = _launch_stacks(events)
    total, outside, by_name = 0.0, 0.0, defaultdict(float)
    for kernel in device:
        dur = float(kernel["dur"])
        total += dur
        names = {n for n in stacks.get((kernel.get("args") or {}).get("correlation"), []) if match in n}
        for name in names:
            by_name[name] += dur
        if not names:
            outside += dur
    lines = [f"{path}: {total / 1e3:.1f} ms of device time in {len(device)} kernels/copies; "
             f"{outside / 1e3:.1f} ms launched outside any function matching {match!r}"]
    for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:rows]:
        lines.append(f"  {us / 1e3:8.2f} ms  {name[:110]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--min-gap-us", type=float, default=5.0)
    parser.add_argument("--by-function", nargs="?", const="", metavar="MATCH",
                        help="instead: device time by the Python functions that launched it (a trace with stacks)")
    args = parser.parse_args(argv)
    if args.by_function is not None:
        print(busy_by_function(args.trace, args.by_function, args.rows))
    else:
        print(report(args.trace, args.rows, args.min_gap_us))
    return 0


if __name__ == "__main__":
    sys.exit(main())
