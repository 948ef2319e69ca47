"""tools/trace_gaps.py charges a GPU's idle time to what the host was doing, from a chrome trace."""
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from trace_gaps import busy_by_function, idle_gaps, report  # noqa: E402


def _x(name, cat, ts, dur, tid=1):
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 0, "tid": tid}


def _trace():
    """One 1000 us step: kernels at 0-100, 90-200 (overlapping), 300-400, 700-1000; idle 200-300 while the
    host launches inside a compiled region, 400-700 while it runs the optimizer's Python."""
    return {"traceEvents": [
        _x("step", "user_annotation", 0, 1000),          # covers everything: not a phase
        _x("Torch-Compiled Region", "cpu_op", 150, 200),
        _x("cudaLaunchKernel", "cuda_runtime", 240, 70),
        _x("Optimizer.step#AdamW.step", "user_annotation", 380, 400),
        _x("aten::_foreach_add_", "cpu_op", 500, 100),
        _x("k1", "kernel", 0, 100, tid=7), _x("k2", "kernel", 90, 110, tid=7),
        _x("k3", "kernel", 300, 100, tid=7), _x("copy", "gpu_memcpy", 700, 300, tid=8),
        {"ph": "i", "name": "marker", "ts": 5},  # instant events are ignored
    ]}


def test_idle_gaps_merge_overlapping_kernels():
    device = [e for e in _trace()["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy")]
    first, last, busy, gaps = idle_gaps(device, min_gap=5)
    assert (first, last, busy) == (0, 1000, 600) and gaps == [(200, 300), (400, 700)]


def test_report_charges_each_gap_to_the_host_events_covering_it(tmp_path):
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(_trace(), f)
    text = report(str(path))
    assert "device span 1.0 ms, busy 0.6 ms, idle 0.4 ms in 2 gaps" in text
    inner = text.split("idle by the innermost host event:")[1].split("idle by the phase")[0]
    assert "0.10 ms  cudaLaunchKernel" in inner and "0.30 ms  aten::_foreach_add_" in inner
    phase = text.split("idle by the phase (outermost host event):")[1]
    assert "0.10 ms  Torch-Compiled Region" in phase and "0.30 ms  Optimizer.step#AdamW.step" in phase
    assert not [line for line in phase.splitlines() if line.endswith("  step")]  # it covers the whole trace
    assert "1 launches (0.1 ms of host time)" in text


def test_min_gap_leaves_short_gaps_out(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(_trace()))
    assert "idle 0.3 ms in 1 gaps >= 150 us" in report(str(path), min_gap_us=150)


def _launch(ts, correlation, tid=1):
    return {**_x("cudaLaunchKernel", "cuda_runtime", ts, 5, tid), "args": {"correlation": correlation}}


def _kernel(ts, dur, correlation):
    return {**_x(f"k{correlation}", "kernel", ts, dur, tid=7), "args": {"correlation": correlation}}


def test_busy_time_is_charged_to_every_python_function_on_the_launching_stack(tmp_path):
    """step() calls partition_grads (two launches) and then optimizer_step (one); the backward thread (tid 2)
    runs a hook; one kernel is launched outside any Python function."""
    trace = {"traceEvents": [
        _x("engine.py(10): step", "python_function", 0, 500),
        _x("stage3.py(1440): partition_grads", "python_function", 10, 100),
        _launch(20, 1), _launch(60, 2),
        _x("stage3.py(2000): optimizer_step", "python_function", 200, 100),
        _launch(250, 3),
        _x("stage3.py(900): reduce_hook", "python_function", 0, 50, tid=2),
        _launch(30, 4, tid=2),
        _launch(600, 5),
        _kernel(100, 40, 1), _kernel(150, 60, 2), _kernel(300, 100, 3), _kernel(400, 7, 4), _kernel(700, 300, 5),
    ]}
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    text = busy_by_function(str(path), "stage3")
    assert "0.5 ms of device time in 5 kernels/copies; 0.3 ms launched outside" in text
    lines = text.splitlines()[1:]
    assert lines == ["      0.10 ms  stage3.py(1440): partition_grads", "      0.10 ms  stage3.py(2000): optimizer_step",
                     "      0.01 ms  stage3.py(900): reduce_hook"]
    everything = busy_by_function(str(path), "", rows=1)
    assert everything.splitlines()[1] == "      0.20 ms  engine.py(10): step"  # 40 + 60 + 100, inclusive
    assert "0.3 ms launched outside any function matching ''" in everything  # k5, after step() returned
    path.write_text(json.dumps(_trace()))
    assert "no Python stacks in the trace" in busy_by_function(str(path))
